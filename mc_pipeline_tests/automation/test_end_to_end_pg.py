"""Sensor ticks and schedule ticks drive real runs on a PostgreSQL-backed instance: 3 clients x 2 lists.

The runs execute in this process one after another (Dagster's in-process execution is not
thread-safe: its logging set-up deadlocks across threads). Runs at once, through the daemon's
queue and its per-account limits, are the deployment test's subject.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from dagster import (
    DagsterInstance,
    RunRequest,
    SensorResult,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
)

from mc_pipeline.assets.keys import CONTACTS_KEY
from mc_pipeline.assets.watermarks import latest_watermark
from mc_pipeline.automation.schedules import CADENCE, hourly_incremental_sync
from mc_pipeline.automation.sensors import mailchimp_lists_sensor
from mc_pipeline.definitions import defs
from mc_pipeline.jobs import SYNC_JOB
from mc_pipeline.local import sandbox_environment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.sandbox import Latency, SandboxConfig
from mc_pipeline.tags import MAILCHIMP_ACCOUNT
from mc_pipeline_tests.automation.test_sensors import apply
from mc_pipeline_tests.helpers import assert_ometria_matches, set_ometria_rate, settle


def launch(instance: DagsterInstance, requests: list[RunRequest]) -> None:
    """Execute each run request as the daemon would: its partition, run config and tags."""
    job = defs.resolve_job_def(SYNC_JOB)
    for r in requests:
        result = job.execute_in_process(
            instance=instance, partition_key=r.partition_key, run_config=r.run_config, tags=r.tags
        )
        assert result.success
        assert instance.get_run_by_id(result.run_id).tags[MAILCHIMP_ACCOUNT] == r.tags[MAILCHIMP_ACCOUNT]


def test_sensor_and_schedule_sync_three_clients_on_postgres(pg_instance: DagsterInstance, tmp_path: Path) -> None:
    config = SandboxConfig.generated(clients=3, lists_per_client=2, members=[700, 1900])
    config.mailchimp.latency = Latency(base_ms=20, per_kb_ms=0.01)
    config.ometria.latency = Latency(base_ms=10)
    with sandbox_environment(config, tmp_path / "work") as env:
        set_ometria_rate(env)  # Ometria's rate is not the subject
        sb = env.sandbox
        resources = {"registry": ClientRegistryResource(path=str(env.registry)), "mailchimp": MailchimpResource()}

        tick = mailchimp_lists_sensor(build_sensor_context(instance=pg_instance, resources=resources))
        assert isinstance(tick, SensorResult) and len(tick.run_requests) == 6
        apply(pg_instance, tick)
        assert sorted(pg_instance.get_dynamic_partitions(MAILCHIMP_LISTS)) == sorted(env.partition_keys())
        launch(pg_instance, tick.run_requests)
        for key in env.partition_keys():
            assert_ometria_matches(sb, key)
            assert latest_watermark(pg_instance, key) is not None  # read back from PostgreSQL
        for c in sb.clients():
            mc, om = sb.stats(f"mailchimp:{c.client_id}"), sb.stats(f"ometria:{c.client_id}")
            assert mc["peak_in_flight"] <= 10 and mc["throttled"] == 0
            assert om["throttled"] == 0

        # An hour of changes, then the hourly tick.
        changed = {}
        for c in sb.clients():
            for list_id in c.list_ids:
                members = sb.mailchimp_list(list_id).members(include_archived=False)
                sb.add_member(list_id, f"added.{list_id}@example.org")
                sb.set_status(list_id, members[0]["id"], "unsubscribed")
                changed[f"{c.client_id}:{list_id}"] = 2
        settle(sb)
        sb.reset_stats()
        # A probe cycle's ticks (10 of 5 minutes), an hour ago: each list is probed at its slot, and
        # changed, requested (the daemon evaluates a tick after its time, so every record is later).
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
        requests = []
        for tick in range(CADENCE.cycle_s // CADENCE.tick_s):
            when = start + timedelta(seconds=CADENCE.tick_s * tick)
            schedule_context = build_schedule_context(
                instance=pg_instance, scheduled_execution_time=when, resources=resources
            )
            result = hourly_incremental_sync(schedule_context)
            requests += [] if isinstance(result, SkipReason) else list(result)
        assert len(requests) == 6 and all(r.tags["mc_pipeline/sync"] == "incremental" for r in requests)
        launch(pg_instance, requests)
        for key in env.partition_keys():
            assert_ometria_matches(sb, key)
        for c in sb.clients():
            # per list: the schedule's probe, then the run's page of changes and its archived probe
            assert sb.stats(f"mailchimp:{c.client_id}")["requests"] == 6
            assert sb.stats(f"ometria:{c.client_id}")["requests"] == 2  # one push per list

        # The runs and their materializations live in PostgreSQL.
        runs = pg_instance.get_runs()
        assert len(runs) == 12 and all(r.is_success for r in runs)
        assert pg_instance.get_latest_materialization_event(CONTACTS_KEY) is not None
