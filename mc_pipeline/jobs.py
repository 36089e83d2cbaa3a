"""The sync job: the three assets of one partition, in one process (per-run overhead matters at scale)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetSelection,
    PartitionedConfig,
    define_asset_job,
    in_process_executor,
)

from mc_pipeline.assets import ASSETS
from mc_pipeline.assets.checks import counts_reconcile
from mc_pipeline.assets.keys import CONTACTS_KEY, PAGES_KEY
from mc_pipeline.assets.mailchimp import SyncConfig
from mc_pipeline.dead_letters import CHECK_NAME
from mc_pipeline.partitions import mailchimp_lists
from mc_pipeline.registry import RegistryError, YamlClientRegistry, parse_partition_key
from mc_pipeline.tags import MAILCHIMP_ACCOUNT, OMETRIA_ACCOUNT, account_tags

SYNC_JOB = "mailchimp_to_ometria_sync"
PAGES_OP = "__".join(PAGES_KEY.path)  # the op name Dagster gives the asset mailchimp/member_pages


def sync_run_config(full_refresh: bool = False, push_all: bool = False) -> dict[str, Any]:
    """The run config of a sync, built from the typed `SyncConfig` (a misspelt field fails here, not in
    the launched run); as the dict the README's `--config-json` shows: the kind, and what differs from
    the defaults (a `RunConfig` would spell out every default in each run's config)."""
    typed = SyncConfig(full_refresh=full_refresh, push_all=push_all)
    return {"ops": {PAGES_OP: {"config": {"full_refresh": full_refresh, **typed.model_dump(exclude_defaults=True)}}}}


def partition_tags(partition_key: str) -> dict[str, str]:
    """Tags every run of the job for a partition gets, however it is launched (launchpad, backfill,
    schedule): the account tags are what the run queue limits, one run at a time per account
    (`dagster/partition`, limited too, Dagster adds itself; it names client and list).

    No `mc_pipeline/sync` kind here: Dagster lets these tags override a RunRequest's own, and
    the sensor's and schedules' kinds ("initial", "incremental") must survive; a run launched
    without one tags itself as it starts (`tags.started_tags`).
    """
    client_id, _ = parse_partition_key(partition_key)
    tags = {MAILCHIMP_ACCOUNT: client_id, OMETRIA_ACCOUNT: client_id}
    path = os.environ.get("MC_PIPELINE_CLIENTS")
    if path:
        with contextlib.suppress(RegistryError, KeyError):  # the run will fail with the registry's message
            tags.update(account_tags(YamlClientRegistry(path).client(client_id)))
    return tags


sync_job = define_asset_job(
    SYNC_JOB,
    # The per-partition checks (reconciliation, outstanding dead letters) run with each sync; the
    # freshness check has its own schedule.
    selection=AssetSelection.assets(*ASSETS).without_checks()
    | AssetSelection.checks(counts_reconcile, AssetCheckKey(CONTACTS_KEY, CHECK_NAME)),
    config=PartitionedConfig(
        partitions_def=mailchimp_lists,
        run_config_for_partition_key_fn=lambda _key: sync_run_config(full_refresh=False),
        tags_for_partition_key_fn=partition_tags,
    ),
    executor_def=in_process_executor,
    description="Bring one client list from Mailchimp into Ometria: incremental from the last watermark.",
)
