"""Schedules: change-aware incremental syncs spread over the hour, a weekly full refresh, freshness checks.

`hourly_incremental_sync` ticks every few minutes and takes the lists whose slot falls in the tick
(automation/cadence.py, probes.py): a probe per list, a run only for those that changed. The weekly refresh
requests a run per partition. Run keys are per partition and period, so a tick evaluated twice
launches nothing twice; a partition whose previous sync is still queued or running is skipped
rather than stacked behind itself.
"""

from datetime import datetime

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
)

from mc_pipeline.automation.checks import contacts_freshness
from mc_pipeline.automation.probes import Cadence, evaluate_tick, in_progress, sync_request
from mc_pipeline.jobs import sync_job
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import RegistryError, YamlClientRegistry, parse_partition_key
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource

# From the environment of the process that loads the code (README, configuration).
CADENCE = Cadence.from_env()


def sync_requests(
    context: ScheduleEvaluationContext, registry: ClientRegistryResource, kind: str, period: str, full: bool
) -> list[RunRequest] | SkipReason:
    """A run for every partition not already syncing (the weekly full refresh)."""
    try:
        reg = YamlClientRegistry(registry.path)
        clients = {c.id: c for c in reg.clients()}
    except RegistryError as exc:
        return SkipReason(f"the client registry was refused; no sync launched.\n{exc}")
    busy, _ = in_progress(context.instance)
    requests, skipped_busy, unknown = [], [], []
    for key in context.instance.get_dynamic_partitions(MAILCHIMP_LISTS):
        client = clients.get(parse_partition_key(key)[0])
        if client is None:
            unknown.append(key)  # the sensor removes partitions of clients gone from the registry
        elif key in busy:
            skipped_busy.append(key)
        else:
            requests.append(sync_request(client, key, kind, period, full))
    if skipped_busy:
        context.log.info(f"{len(skipped_busy)} partitions still syncing, skipped: {skipped_busy[:20]}")
    if unknown:
        context.log.warning(f"{len(unknown)} partitions of clients not in the registry: {unknown[:20]}")
    return requests or SkipReason(f"nothing to launch ({len(skipped_busy)} busy, {len(unknown)} unknown)")


def _scheduled(context: ScheduleEvaluationContext) -> datetime:
    return context.scheduled_execution_time or datetime.now()


@schedule(
    name="hourly_incremental_sync",
    cron_schedule=CADENCE.cron,
    job=sync_job,
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Each list verified or synced within every hour: a probe of Mailchimp at its own slot (every "
    "50 minutes, two ticks left for a deferral and the import); a run only if the list changed.",
)
def hourly_incremental_sync(
    context: ScheduleEvaluationContext, registry: ClientRegistryResource, mailchimp: MailchimpResource
) -> list[RunRequest] | SkipReason:
    return evaluate_tick(context, registry, mailchimp, CADENCE)[0]


@schedule(
    name="weekly_full_refresh",
    cron_schedule="30 3 * * 0",
    job=sync_job,
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Sundays 03:30 UTC, a full sync of every partition: reconciles what windows cannot see.",
)
def weekly_full_refresh(
    context: ScheduleEvaluationContext, registry: ClientRegistryResource
) -> list[RunRequest] | SkipReason:
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
    description="Every 15 minutes, the freshness check of every list: its last successful import under two hours old.",
)
def freshness_checks(context: ScheduleEvaluationContext) -> RunRequest:
    return RunRequest(run_key=_scheduled(context).strftime("freshness:%Y-%m-%dT%H:%M"))
