"""The hourly and weekly schedules and the freshness check, evaluated against an instance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dagster import DagsterInstance, DagsterRunStatus, SkipReason, build_schedule_context
from dagster._core.test_utils import create_run_for_test

from mc_pipeline.automation.schedules import CADENCE, hourly_incremental_sync, weekly_full_refresh
from mc_pipeline.definitions import defs
from mc_pipeline.local import LocalEnvironment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.tags import MAILCHIMP_ACCOUNT, OMETRIA_ACCOUNT, SYNC_KIND
from mc_pipeline_tests.helpers import sync

WHEN = datetime(2026, 11, 23, 14, 0, tzinfo=UTC)


def evaluate(schedule, instance: DagsterInstance, env: LocalEnvironment, when: datetime = WHEN):
    context = build_schedule_context(
        instance=instance,
        scheduled_execution_time=when,
        resources={"registry": ClientRegistryResource(path=str(env.registry)), "mailchimp": MailchimpResource()},
    )
    result = schedule(context)
    return result if isinstance(result, SkipReason) else list(result)


def evaluate_hour(instance: DagsterInstance, env: LocalEnvironment, hour: datetime = WHEN) -> list:
    """The ten five-minute ticks of one probe cycle (50 minutes): each list is due in exactly one."""
    out = []
    for i in range(CADENCE.cycle_s // CADENCE.tick_s):
        result = evaluate(hourly_incremental_sync, instance, env, hour + timedelta(seconds=CADENCE.tick_s * i))
        out += [] if isinstance(result, SkipReason) else result
    return out


def test_the_hour_requests_one_incremental_run_per_list_never_imported(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """No watermark to probe from: a run each, at the list's own slot in the cycle, once."""
    keys = small_env.partition_keys()
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, keys)
    requests = evaluate_hour(instance, small_env)
    assert sorted(r.partition_key for r in requests) == sorted(keys)
    for r in requests:
        ahead = (CADENCE.slot(r.partition_key) - int(WHEN.timestamp())) % CADENCE.cycle_s
        slot = WHEN + timedelta(seconds=ahead)  # its own instant in the cycle
        assert r.run_key == f"incremental:{r.partition_key}:{slot:%Y-%m-%dT%H:%M:%S}"
        assert r.run_config["ops"]["mailchimp__member_pages"]["config"]["full_refresh"] is False
        assert r.tags[SYNC_KIND] == "incremental"
        assert r.tags[MAILCHIMP_ACCOUNT] == "client-1" and r.tags[OMETRIA_ACCOUNT] == "client-1"
    twice = evaluate_hour(instance, small_env)
    assert [r.run_key for r in twice] == [r.run_key for r in requests]  # the daemon launches a run key once
    next_hour = evaluate_hour(instance, small_env, WHEN.replace(hour=15))
    assert {r.run_key for r in next_hour}.isdisjoint({r.run_key for r in requests})


def test_a_partition_still_syncing_is_skipped(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    busy, idle = small_env.partition_keys()
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, [busy, idle])
    for status in (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTED):  # QUEUED needs a code location
        run = create_run_for_test(
            instance, job_name="mailchimp_to_ometria_sync", status=status, tags={"dagster/partition": busy}
        )
        assert [r.partition_key for r in evaluate_hour(instance, small_env)] == [idle]
        instance.report_run_failed(run)
    assert len(evaluate_hour(instance, small_env)) == 2


def test_weekly_full_refresh(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, small_env.partition_keys())
    requests = evaluate(weekly_full_refresh, instance, small_env, datetime(2026, 11, 22, 3, 30, tzinfo=UTC))
    assert len(requests) == 2
    for r in requests:
        assert r.run_config["ops"]["mailchimp__member_pages"]["config"]["full_refresh"] is True
        assert r.run_key == f"full_refresh:{r.partition_key}:2026-W47"


def test_no_partitions_no_runs(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    assert isinstance(evaluate(hourly_incremental_sync, instance, small_env), SkipReason)
    assert evaluate_hour(instance, small_env) == []


def test_freshness_check_names_the_stale_lists(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    synced, never = small_env.partition_keys()
    sync(instance, synced)
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, [never])
    result = defs.resolve_job_def("contacts_freshness_check").execute_in_process(instance=instance)
    evaluation = result.get_asset_check_evaluations()[0]
    assert not evaluation.passed
    md = {k: v.value for k, v in evaluation.metadata.items()}
    assert md["lists"] == 2 and md["stale_lists"] == 1 and md["never_imported"] == 1
    assert never in md["stale"] and synced not in md["stale"]
