"""Two runs of one list, or of one account, never sync at once; deletions are judged only on what
a full fetch could list (issue 9, item 6)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from mc_pipeline.local import LocalEnvironment
from mc_pipeline.sandbox.config import Faults
from mc_pipeline.staging import id_keys
from mc_pipeline.storage import KnownContacts
from mc_pipeline_tests.helpers import assert_ometria_matches, sync

HOLD_S = 4.0  # how long the first run's first Mailchimp page is held: the second run starts meanwhile


def wait_until(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def started_runs(instance: DagsterInstance) -> list[str]:
    return [r.dagster_run.run_id for r in instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED]))]


def waits_logged(instance: DagsterInstance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if "waiting for run(s)" in (e.user_message or "")]


def test_two_lists_of_one_account_without_account_tags_do_not_sync_at_once(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """`materialize` (like the asset graph and `dagster asset materialize`) runs the implicit asset
    job: no account tags, no queue. The second run finds its accounts in the registry and waits
    for the first, whose first page is held while the second starts."""
    sb = small_env.sandbox
    first_list, second_list = sb.client("client-1").list_ids
    sb.set_fault_rates(first_list, Faults(slow_rate=1e-9, slow_delay_s=HOLD_S))
    sb.script_faults(first_list, ["slow"])
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(sync, instance, f"client-1:{first_list}")
        wait_until(lambda: len(started_runs(instance)) == 1, what="the first run to start")
        (first_id,) = started_runs(instance)
        two = pool.submit(sync, instance, f"client-1:{second_list}")
        a, b = one.result(), two.result()
    assert a.run_id == first_id and a.success and b.success
    assert "mc_pipeline/ometria_account" not in instance.get_run_by_id(b.run_id).tags
    (line,) = waits_logged(instance, b.run_id)
    assert a.run_id in line and "mc_pipeline/ometria_account=client-1" in line
    assert instance.get_run_record_by_id(a.run_id).end_time <= min(
        e.timestamp for e in instance.all_logs(b.run_id) if "full sync of list" in (e.user_message or "")
    )
    assert_ometria_matches(sb, f"client-1:{first_list}")
    assert_ometria_matches(sb, f"client-1:{second_list}")


def ids(n: int, start: int = 0) -> list[str]:
    return [f"{i:032x}" for i in range(start, start + n)]


def test_a_full_refresh_judges_only_contacts_seen_up_to_its_window(tmp_path: Path) -> None:
    """The reconcile's selection: not listed AND last seen at or before the full fetch's bound."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    full_before = t0 + timedelta(hours=1)  # the full refresh's window: last_changed up to here
    known = KnownContacts(tmp_path / "known")
    old = ids(100)
    known.add("initial", pa.table({"id": old, "email": [f"{i}@x.org" for i in old]}), seen=t0)
    # A concurrent incremental, started after the full fetch's window closed, pushed 50 new members
    # and re-pushed 2 old ones; the full fetch could list none of them.
    pushed_beside = ids(50, start=1000) + old[:2]
    known.add("beside", pa.table({"id": pushed_beside, "email": ["n@x.org"] * 52}), seen=full_before + timedelta(1))
    listed = old[5:]  # the full fetch listed the old members but five (deleted in Mailchimp)
    gone = known.reconcile(id_keys(pa.array(listed)), id_keys, judged_until=full_before)
    assert sorted(gone.column("id").to_pylist()) == old[2:5]  # two of the five were seen after the bound
    kept = {r["id"]: r["seen"] for r in known.read().to_pylist()}
    assert set(kept) == set(old[5:]) | set(pushed_beside)
    assert kept[old[0]] == full_before + timedelta(1)  # the latest time seen carries into the base
    # The next full refresh, whose window covers them, judges them like any other.
    gone = known.reconcile(id_keys(pa.array(old[5:])), id_keys, judged_until=full_before + timedelta(2))
    assert sorted(gone.column("id").to_pylist()) == sorted(pushed_beside)


def test_known_contacts_from_before_seen_times_are_judged_and_adopted(tmp_path: Path) -> None:
    """Files written before `seen` existed have no time: they are old, so judged; the first
    destination asked takes them over."""
    import pyarrow.parquet as pq

    from mc_pipeline.storage import PipelineStorage

    storage = PipelineStorage(data_dir=str(tmp_path))
    legacy = storage.known_contacts("acme:1a2d7ebf82").folder
    legacy.mkdir(parents=True)
    pq.write_table(pa.table({"id": ids(3), "email": ["a", "b", "c"]}), legacy / "base.parquet")
    known = storage.known_contacts("acme:1a2d7ebf82", "0123456789abcdef")
    assert known.folder == legacy / "0123456789abcdef" and not (legacy / "base.parquet").exists()
    assert storage.known_contacts("acme:1a2d7ebf82").folder == known.folder  # now the current destination
    gone = known.reconcile(id_keys(pa.array(ids(2))), id_keys, judged_until=datetime(2026, 1, 1, tzinfo=UTC))
    assert gone.column("id").to_pylist() == ids(3)[2:]


def test_two_dagster_asset_materialize_of_one_list_never_sync_at_once(tmp_path: Path) -> None:
    """The issue's own path: the README's `dagster asset materialize`, a full refresh and an
    incremental, two processes on one DAGSTER_HOME (in process: no queue). The full refresh is
    frozen (SIGSTOP) while its first page is in flight; the incremental must wait for it."""
    import json
    import os
    import signal
    import subprocess

    from dagster import AssetRecordsFilter

    from mc_pipeline.assets.keys import CONTACTS_KEY
    from mc_pipeline.jobs import sync_run_config
    from mc_pipeline.local import patched_environ, sandbox_environment
    from mc_pipeline.partitions import MAILCHIMP_LISTS
    from mc_pipeline.sandbox import SandboxConfig
    from mc_pipeline_tests.helpers import dagster_materialize_command

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    config = SandboxConfig.generated(clients=1, lists_per_client=1, members=1200)
    with sandbox_environment(config, tmp_path / "work") as env, patched_environ({"DAGSTER_HOME": str(home)}):
        sb, partition = env.sandbox, env.partition_keys()[0]
        list_id = partition.split(":")[1]
        with DagsterInstance.get() as instance:
            instance.add_dynamic_partitions(MAILCHIMP_LISTS, [partition])
            initial = sync(instance, partition).run_id
            sb.reset_stats()
            sb.set_fault_rates(list_id, Faults(slow_rate=1e-9, slow_delay_s=1.0))
            sb.script_faults(list_id, ["slow"])

            def start(*extra: str) -> subprocess.Popen:
                log = (tmp_path / f"cli-{len(extra)}.log").open("ab")
                cmd = dagster_materialize_command(partition, *extra)
                return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

            full = start("--config-json", json.dumps(sync_run_config(full_refresh=True)))
            try:
                wait_until(lambda: sb.stats("mailchimp:client-1")["requests"] >= 1, what="the full refresh's fetch")
                os.killpg(full.pid, signal.SIGSTOP)  # in flight on HTTP, not in a database write
                (first_id,) = started_runs(instance)
                new = [sb.add_member(list_id, f"beside-{i}@example.com") for i in range(50)]  # after its window
                incremental = start()
                wait_until(
                    lambda: (
                        any(waits_logged(instance, r) for r in started_runs(instance) if r != first_id)
                        or incremental.poll() is not None
                    ),
                    timeout_s=120,
                    what="the incremental to wait",
                )
            finally:
                os.killpg(full.pid, signal.SIGCONT)
            assert full.wait(120) == 0 and incremental.wait(120) == 0
            held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
            opted_out = [m for m in new if held[m["contact_id"]]["marketing_optin"] == "EXPLICITLY_OPTEDOUT"]
            assert not opted_out, f"{len(opted_out)} of the {len(new)} members pushed beside the full refresh opted out"
            assert_ometria_matches(sb, partition)
            (second_id,) = {r.run_id for r in instance.get_runs()} - {initial, first_id}
            assert waits_logged(instance, second_id), "the second process did not wait for the first"
            assert instance.get_run_by_id(first_id).run_config == sync_run_config(full_refresh=True)
            # It started where the full refresh ended, so it synced after it, not beside it.
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=CONTACTS_KEY, asset_partitions=[partition]), limit=5
            ).records
            (marks,) = [r.asset_materialization.metadata for r in records if r.run_id == first_id]
            watermark = datetime.fromtimestamp(marks["watermark"].value, UTC)
            (pages,) = [
                e.user_message for e in instance.all_logs(second_id) if "incremental sync of list" in e.user_message
            ]
            assert watermark.isoformat() in pages
