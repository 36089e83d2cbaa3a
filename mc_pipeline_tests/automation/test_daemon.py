"""The per-account limit across runs, proven with a real dagster-daemon: sensor, run queue, launcher.

Three lists of one account, each big enough to keep 10 requests in flight. With the run
queue's per-account tag limit (what dagster.yaml configures), the account's runs never overlap
and the sandbox never answers 429. Without it (the control), the queue starts them side by side
and the runs themselves wait for one another (the in-run guard, for runs that bypass the queue).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from mc_pipeline.local import dagster_daemon, local_instance_yaml, patched_environ, sandbox_environment
from mc_pipeline.sandbox import Latency, SandboxConfig
from mc_pipeline.tags import SYNC_KIND
from mc_pipeline_tests.helpers import assert_ometria_matches, set_ometria_rate

NO_TAG_LIMITS = (
    "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: QueuedRunCoordinator\n"
    "  config:\n    max_concurrent_runs: 3\n    dequeue_interval_seconds: 1\n"
    "telemetry:\n  enabled: false\n"
)
POLL_S = 0.1  # the loops below wait on a condition, each with a deadline


def run_three_lists(tmp_path: Path, instance_yaml: str) -> tuple[dict, list[tuple[float, float]]]:
    config = SandboxConfig.generated(clients=1, lists_per_client=3, members=11_500)
    # A fetch lasts ~6 s (a first page, then two waves of 10): several launch intervals, so the
    # fetches of runs launched one after another overlap whenever nothing holds them apart.
    config.mailchimp.latency = Latency(base_ms=2000)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml)
    settings = {"DAGSTER_HOME": str(home), "MC_PIPELINE_SENSOR_INTERVAL_S": "2"}
    with sandbox_environment(config, tmp_path / "work") as env, patched_environ(settings):
        set_ometria_rate(env, 50, 50)  # a raised plan limit (a quicker test) that the client's limiter holds
        with DagsterInstance.get() as instance, dagster_daemon(tmp_path / "daemon.log") as daemon:
            deadline = time.monotonic() + 240
            while True:
                runs = instance.get_runs(filters=RunsFilter(tags={SYNC_KIND: "initial"}))  # not the other schedules
                if len(runs) == 3 and all(r.status == DagsterRunStatus.SUCCESS for r in runs):
                    break
                if any(r.status == DagsterRunStatus.FAILURE for r in runs) or daemon.poll() is not None:
                    pytest.fail(f"a run failed or the daemon died:\n{(tmp_path / 'daemon.log').read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("the three syncs did not finish in time")
                time.sleep(POLL_S)
            records = instance.get_run_records(filters=RunsFilter(tags={SYNC_KIND: "initial"}))
            spans = sorted((rec.start_time, rec.end_time) for rec in records if rec.start_time and rec.end_time)
        stats = env.sandbox.stats("mailchimp:client-1")
        ometria = env.sandbox.stats("ometria:client-1")
        stats["ometria_throttled"], stats["ometria_requests"] = ometria["throttled"], ometria["requests"]
        for key in env.partition_keys():
            assert_ometria_matches(env.sandbox, key)
        return stats, spans


def overlapping(spans: list[tuple[float, float]]) -> bool:
    return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


def test_one_accounts_lists_sync_one_run_at_a_time_within_ten_connections(tmp_path: Path) -> None:
    stats, spans = run_three_lists(tmp_path, local_instance_yaml(max_concurrent_runs=3))
    print(f"with the tag limit: {stats}")
    assert not overlapping(spans)  # the queue held the account's other runs back
    assert stats["peak_in_flight"] == 10  # each run used the account's 10 connections...
    assert stats["throttled"] == 0  # ...and never an 11th
    # One run pushing per Ometria account: its limiter holds the rate. Two runs pushing at once would
    # each send 50 a second against a limit of 50: about half answered 429. A 429 or two out of ~350
    # happen on a loaded machine (a request delayed in transit lands in the next request's second);
    # they are retried after Retry-After, so the goal is benchmark 2b's: under 1%.
    assert stats["ometria_requests"] >= 345
    assert stats["ometria_throttled"] < 0.01 * stats["ometria_requests"]


def test_without_the_tag_limit_the_runs_themselves_keep_the_account_whole(tmp_path: Path) -> None:
    """The control: with no tag limit the queue starts the account's runs side by side; each then
    waits for those that started before it (mc_pipeline/run_guard.py), as runs that bypass the
    queue do, so the account still never sees an 11th connection (before the guard: 429s)."""
    stats, spans = run_three_lists(tmp_path, NO_TAG_LIMITS)
    print(f"without the tag limit: {stats}")
    assert overlapping(spans)  # the queue did not hold them apart...
    assert stats["throttled"] == 0 and stats["peak_in_flight"] <= 10  # ...the runs did


RETRIES = (
    "run_monitoring:\n  enabled: true\n  poll_interval_seconds: 5\n  max_resume_run_attempts: 0\n"
    "run_retries:\n  enabled: true\n  max_retries: 2\n  retry_on_asset_or_op_failure: false\n"
)


def test_a_killed_run_worker_is_retried_by_the_daemon_and_converges(tmp_path: Path) -> None:
    """dagster.yaml's run retries: the run's process dies mid-push; the daemon re-runs it."""
    import os
    import signal

    config = SandboxConfig.generated(clients=1, lists_per_client=1, members=6000)
    config.ometria.latency = Latency(base_ms=40)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(local_instance_yaml() + RETRIES)
    settings = {"DAGSTER_HOME": str(home), "MC_PIPELINE_SENSOR_INTERVAL_S": "2"}
    with sandbox_environment(config, tmp_path / "work") as env, patched_environ(settings):
        set_ometria_rate(env, 100, 25)  # not the subject: a 2.4 s push, still long enough to kill it midway
        sb = env.sandbox
        with DagsterInstance.get() as instance, dagster_daemon(tmp_path / "daemon.log") as daemon:
            deadline = time.monotonic() + 180
            while sb.ometria_writes("client-1") < 1000:  # the first run is pushing
                if time.monotonic() > deadline or daemon.poll() is not None:
                    pytest.fail(f"no push began:\n{(tmp_path / 'daemon.log').read_text()[-3000:]}")
                time.sleep(0.05)
            (first,) = instance.get_runs()
            events = [e.dagster_event for e in instance.all_logs(first.run_id) if e.dagster_event]
            pids = {e.pid for e in events if e.pid and e.pid != os.getpid()}
            for pid in pids:  # the run worker (and its step process, if any)
                os.kill(pid, signal.SIGKILL)
            while True:
                runs = instance.get_runs()
                done = [r for r in runs if r.status == DagsterRunStatus.SUCCESS]
                if done:
                    break
                if time.monotonic() > deadline + 120 or daemon.poll() is not None:
                    pytest.fail(f"no retry succeeded:\n{(tmp_path / 'daemon.log').read_text()[-3000:]}")
                time.sleep(POLL_S)
            assert instance.get_run_by_id(first.run_id).status == DagsterRunStatus.FAILURE
            assert done[0].tags.get("dagster/parent_run_id") == first.run_id  # a retry of the killed run
            assert done[0].tags["mc_pipeline/mailchimp_account"] == "client-1"  # through the same queue limits
        assert_ometria_matches(sb, env.partition_keys()[0])
        assert len(sb.ometria_contacts("client-1")) < sb.ometria_writes("client-1")  # resent, held once
