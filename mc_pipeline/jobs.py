"""The sync job: the three assets of one partition, in one process (per-run overhead matters at scale)."""

from __future__ import annotations

from typing import Any

from dagster import AssetSelection, define_asset_job, in_process_executor

from mc_pipeline.assets import ASSETS
from mc_pipeline.assets.mailchimp import PAGES_KEY
from mc_pipeline.partitions import mailchimp_lists

SYNC_JOB = "mailchimp_to_ometria_sync"
PAGES_OP = "__".join(PAGES_KEY.path)  # the op name Dagster gives the asset mailchimp/member_pages

sync_job = define_asset_job(
    SYNC_JOB,
    selection=AssetSelection.assets(*ASSETS).without_checks(),  # the freshness check has its own schedule
    partitions_def=mailchimp_lists,
    executor_def=in_process_executor,
    description="Bring one client list from Mailchimp into Ometria: incremental from the last watermark.",
)


def sync_run_config(full_refresh: bool = False) -> dict[str, Any]:
    return {"ops": {PAGES_OP: {"config": {"full_refresh": full_refresh}}}}
