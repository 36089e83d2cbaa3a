"""Everything Dagster loads: `dagster dev -m mc_pipeline.definitions`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from dagster import (
    AnchorBasedFilePathMapping,
    AssetsDefinition,
    Definitions,
    EnvVar,
    in_process_executor,
    link_code_references_to_git,
    with_source_code_references,
)
from dagster._utils.warnings import BetaWarning

from mc_pipeline.assets import ASSETS
from mc_pipeline.automation import CHECKS, JOBS, SCHEDULES, SENSORS
from mc_pipeline.io_manager import StateIOManager
from mc_pipeline.jobs import sync_job
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource, OmetriaResource
from mc_pipeline.storage import PipelineStorage


def resources() -> dict[str, object]:
    return {
        "registry": ClientRegistryResource(path=EnvVar("MC_PIPELINE_CLIENTS")),
        "mailchimp": MailchimpResource(),
        "ometria": OmetriaResource(),
        "storage": PipelineStorage(),
        "state_io_manager": StateIOManager(),
    }


def code_referenced(assets: Sequence[AssetsDefinition]) -> list:
    """Each asset links to its source: the local file, or with `MC_PIPELINE_GIT_URL` (and
    `MC_PIPELINE_GIT_BRANCH`, default main) the file in the repository's web view."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)  # code references are beta in Dagster 1.13
        referenced = with_source_code_references(assets)
        url = os.environ.get("MC_PIPELINE_GIT_URL")
        if not url:
            return list(referenced)
        anchor = Path(__file__)
        mapping = AnchorBasedFilePathMapping(
            local_file_anchor=anchor, file_anchor_path_in_repository=f"mc_pipeline/{anchor.name}"
        )
        branch = os.environ.get("MC_PIPELINE_GIT_BRANCH", "main")
        return list(link_code_references_to_git(referenced, git_url=url, git_branch=branch, file_path_mapping=mapping))


defs = Definitions(
    assets=code_referenced(ASSETS),
    asset_checks=CHECKS,
    jobs=[sync_job, *JOBS],
    sensors=SENSORS,
    schedules=SCHEDULES,
    resources=resources(),
    executor=in_process_executor,
)
