"""Schedules: hourly incremental syncs of every partition, a weekly full refresh, freshness checks.

One `RunRequest` per partition with a `run_key` per partition and period, so a tick evaluated
twice launches nothing twice; a partition whose previous sync is still queued or running is
skipped rather than stacked behind itself.
"""

import os
from datetime import datetime

from dagster import (
    AssetSelection,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
)

from mc_pipeline.automation.checks import contacts_freshness
from mc_pipeline.jobs import sync_job, sync_run_config
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import RegistryError, YamlClientRegistry, parse_partition_key
from mc_pipeline.resources import ClientRegistryResource
from mc_pipeline.tags import run_tags

# Overridable so a demo or a test can watch the daemon tick within a minute; production keeps hourly.
INCREMENTAL_CRON = os.environ.get("MC_PIPELINE_INCREMENTAL_CRON", "0 * * * *")

IN_PROGRESS = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


def busy_partitions(instance: DagsterInstance) -> set[str]:
    """Partitions with a run queued or running, whatever job launched it (UI, backfill, schedule)."""
    records = instance.get_run_records(filters=RunsFilter(statuses=IN_PROGRESS))
    return {r.dagster_run.tags["dagster/partition"] for r in records if "dagster/partition" in r.dagster_run.tags}


def sync_requests(
    context: ScheduleEvaluationContext, registry: ClientRegistryResource, kind: str, period: str, full: bool
) -> list[RunRequest] | SkipReason:
    try:
        reg = YamlClientRegistry(registry.path)
        clients = {c.id: c for c in reg.clients()}
    except RegistryError as exc:
        return SkipReason(f"the client registry was refused; no sync launched.\n{exc}")
    busy = busy_partitions(context.instance)
    requests, skipped_busy, unknown = [], [], []
    for key in context.instance.get_dynamic_partitions(MAILCHIMP_LISTS):
        client_id, list_id = parse_partition_key(key)
        client = clients.get(client_id)
        if client is None:
            unknown.append(key)  # the sensor removes partitions of clients gone from the registry
            continue
        if key in busy:
            skipped_busy.append(key)
            continue
        requests.append(
            RunRequest(
                partition_key=key,
                run_key=f"{kind}:{key}:{period}",
                run_config=sync_run_config(full_refresh=full),
                tags=run_tags(client, list_id, kind),
            )
        )
    if skipped_busy:
        context.log.info(f"{len(skipped_busy)} partitions still syncing, skipped: {skipped_busy[:20]}")
    if unknown:
        context.log.warning(f"{len(unknown)} partitions of clients not in the registry: {unknown[:20]}")
    return requests or SkipReason(f"nothing to launch ({len(skipped_busy)} busy, {len(unknown)} unknown)")


def _scheduled(context: ScheduleEvaluationContext) -> datetime:
    return context.scheduled_execution_time or datetime.now()


@schedule(
    name="hourly_incremental_sync",
    cron_schedule=INCREMENTAL_CRON,
    job=sync_job,
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Every hour, an incremental sync of every partition (since its last watermark).",
)
def hourly_incremental_sync(context: ScheduleEvaluationContext, registry: ClientRegistryResource):
    return sync_requests(context, registry, "incremental", _scheduled(context).strftime("%Y-%m-%dT%H:%M"), full=False)


@schedule(
    name="weekly_full_refresh",
    cron_schedule="30 3 * * 0",
    job=sync_job,
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Sundays 03:30 UTC, a full sync of every partition: reconciles what windows cannot see.",
)
def weekly_full_refresh(context: ScheduleEvaluationContext, registry: ClientRegistryResource):
    return sync_requests(context, registry, "full_refresh", _scheduled(context).strftime("%G-W%V"), full=True)


freshness_check_job = define_asset_job(
    "contacts_freshness_check",
    selection=AssetSelection.checks(contacts_freshness),
    description="Flags every client list whose last successful import is over two hours old.",
)


@schedule(
    name="freshness_checks",
    cron_schedule="*/15 * * * *",
    job=freshness_check_job,
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
)
def freshness_checks(context: ScheduleEvaluationContext):
    return RunRequest(run_key=_scheduled(context).strftime("freshness:%Y-%m-%dT%H:%M"))
