"""Crash safety for real: the run's process is SIGKILLed mid-fetch and mid-push, then run again.

The run is `dagster asset materialize` in its own process group against a persistent instance;
the sandbox lives in the test's process, so it outlives the kill and witnesses what arrived.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from mc_pipeline.assets.watermarks import latest_watermark
from mc_pipeline.local import LocalEnvironment, patched_environ, sandbox_environment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.sandbox import Latency, SandboxConfig
from mc_pipeline_tests.helpers import (
    assert_ometria_matches,
    dagster_materialize_command,
    expected_contacts,
    set_ometria_rate,
    settle,
    sync,
)


def start_materialize(partition: str, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        dagster_materialize_command(partition, *extra),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ),
    )


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the kill point was not reached in time")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture
def crash_env(tmp_path: Path):
    config = SandboxConfig.generated(clients=1, lists_per_client=1, members=6000)
    config.mailchimp.latency = Latency(base_ms=150)
    config.ometria.latency = Latency(base_ms=40)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with (
        sandbox_environment(config, tmp_path / "work") as env,
        patched_environ({"DAGSTER_HOME": str(home)}),
        DagsterInstance.get() as instance,
    ):
        set_ometria_rate(env, 100, 25)  # not the subject: a 2.4 s push, still long enough to kill it midway
        instance.add_dynamic_partitions(MAILCHIMP_LISTS, env.partition_keys())
        yield env, instance, tmp_path / "run.log"


@pytest.mark.parametrize("moment", ["mid-fetch", "mid-push"])
def test_a_killed_run_converges_when_run_again(
    crash_env: tuple[LocalEnvironment, DagsterInstance, Path], moment: str
) -> None:
    env, instance, log = crash_env
    sb = env.sandbox
    partition = env.partition_keys()[0]
    list_id = partition.split(":")[1]
    expected = expected_contacts(sb, list_id)

    if moment == "mid-fetch":

        def reached() -> bool:
            return sb.stats("mailchimp:client-1")["requests"] >= 3  # pages under way, nothing pushed yet
    else:

        def reached() -> bool:
            return sb.ometria_writes("client-1") >= 1500  # some batches stored, most not

    kill_when(start_materialize(partition, log), reached, log)
    held = len(sb.ometria_contacts("client-1"))
    assert held < len(expected)  # the crash did interrupt the import
    if moment == "mid-fetch":
        assert held == 0
    assert latest_watermark(instance, partition) is None  # nothing recorded as imported
    orphans = instance.get_runs()
    assert len(orphans) == 1 and orphans[0].status == DagsterRunStatus.STARTED  # as the kill left it

    # Run it again (a retry, or the next hourly run): the same window, pushed again as upserts.
    assert sync(instance, partition).success
    assert_ometria_matches(sb, partition)
    assert len(sb.ometria_contacts("client-1")) == len(expected)  # every member exactly once
    assert latest_watermark(instance, partition) is not None


def test_a_killed_incremental_keeps_the_previous_watermark(
    crash_env: tuple[LocalEnvironment, DagsterInstance, Path],
) -> None:
    env, instance, log = crash_env
    sb = env.sandbox
    partition = env.partition_keys()[0]
    list_id = partition.split(":")[1]
    assert sync(instance, partition).success
    watermark = latest_watermark(instance, partition)
    members = sb.mailchimp_list(list_id).members(include_archived=False)[:600]
    for m in members:
        sb.update_member(list_id, m["id"], merge_fields={"FNAME": "Changed"})
    settle(sb)
    writes = sb.ometria_writes("client-1")
    kill_when(start_materialize(partition, log), lambda: sb.ometria_writes("client-1") >= writes + 200, log)
    assert latest_watermark(instance, partition) == watermark  # the watermark never passed the crash
    assert sync(instance, partition).success
    assert_ometria_matches(sb, partition)
    held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
    assert all(held[m["contact_id"]]["firstname"] == "Changed" for m in members)
