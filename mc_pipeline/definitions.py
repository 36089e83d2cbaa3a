"""Everything Dagster loads: `dagster dev -m mc_pipeline.definitions`."""

from __future__ import annotations

from dagster import Definitions, EnvVar, in_process_executor

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


defs = Definitions(
    assets=ASSETS,
    asset_checks=CHECKS,
    jobs=[sync_job, *JOBS],
    sensors=SENSORS,
    schedules=SCHEDULES,
    resources=resources(),
    executor=in_process_executor,
)
