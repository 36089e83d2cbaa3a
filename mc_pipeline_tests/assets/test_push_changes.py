"""Push only what changed (issue 11, item 4), end to end against the sandbox: a record Ometria last
accepted byte for byte is skipped, a `last_changed` bump alone costs no push, a full refresh of an
unchanged list pushes nothing but tombstones, `push_all` pushes everything, and a crash mid-push
keeps what Ometria had accepted by the last checkpoint."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from dagster import DagsterInstance

from mc_pipeline.local import LocalEnvironment, sandbox_environment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.sandbox import SandboxConfig
from mc_pipeline.staging import id_keys
from mc_pipeline.storage import PipelineStorage, RunFolder
from mc_pipeline.transform import record_dicts
from mc_pipeline_tests.faults.test_crash import crash_env, kill_when, start_materialize
from mc_pipeline_tests.faults.test_rejections import _list, _pattern
from mc_pipeline_tests.helpers import assert_ometria_matches, expected_contacts, metadata, settle, sync

__all__ = ["crash_env"]  # the fixture, shared with the crash tests


def _fast_pushes(config: SandboxConfig, env: LocalEnvironment) -> None:
    """The push rate is not what these tests measure: a raised plan limit keeps them quick."""
    config.ometria.rate_per_second = 1000
    config.ometria.backlog_limit = 1_000_000
    config.ometria.drain_per_second = 1_000_000
    registry = yaml.safe_load(env.registry.read_text())
    registry["clients"][0]["ometria"]["requests_per_second"] = 100
    env.registry.write_text(yaml.safe_dump(registry))


def _contacts(instance: DagsterInstance, partition: str, **kw: bool) -> dict:
    result = sync(instance, partition, **kw)
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.description  # records = unchanged skipped + accepted + rejected
    return metadata(result, "ometria/contacts")


def test_20000_members_10000_bumped_100_changed_pushes_100(tmp_path: Path, instance: DagsterInstance) -> None:
    config = SandboxConfig.generated(clients=1, lists_per_client=1, members=20_000)
    with sandbox_environment(config, tmp_path / "work") as env:
        _fast_pushes(config, env)
        sb = env.sandbox
        (partition,) = env.partition_keys()
        list_id = partition.split(":")[1]
        first = _contacts(instance, partition)
        n = len(expected_contacts(sb, list_id))
        assert first["records"] == first["pushed"] == first["accepted"] == n and first["unchanged_skipped"] == 0

        # Mailchimp bumps last_changed on 10,000 subscribed members (an update that changes nothing
        # Ometria gets); 100 of them really change.
        listed = sb.mailchimp_list(list_id).members(include_archived=False)
        subscribed = [m for m in listed if m["status"] == "subscribed"]
        touched, changed = subscribed[:10_000], subscribed[:100]
        for m in touched:
            sb.update_member(list_id, m["id"])
        for m in changed:
            sb.update_member(list_id, m["id"], merge_fields={"FNAME": "Changed"})
        settle(sb)  # the changes fall before the window's end
        writes = sb.ometria_writes("client-1")
        incremental = _contacts(instance, partition)
        assert incremental["records"] == 10_000
        assert incremental["unchanged_skipped"] == 9_900
        assert incremental["pushed"] == incremental["accepted"] == 100
        assert sb.ometria_writes("client-1") - writes == 100
        held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
        assert all(held[m["contact_id"]]["firstname"] == "Changed" for m in changed)

        # The weekly full refresh of the (now unchanged) list is a reconciliation: nothing to push.
        settle(sb)
        sb.reset_stats()
        full = _contacts(instance, partition, full_refresh=True)
        assert full["records"] == full["unchanged_skipped"] == n
        assert full["pushed"] == full["accepted"] == 0 and full["deleted_in_mailchimp_opted_out"] == 0
        assert sb.stats("ometria:client-1")["requests"] == 0
        assert_ometria_matches(sb, partition)


def test_only_differences_and_tombstones_are_pushed(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    """Every byte Ometria stores counts: an opted-out member's bump moves `timestamp_unsubscribed`, so
    it is pushed; a deleted member costs one tombstone; a member re-added after that is pushed again;
    `push_all` pushes every record."""
    sb = small_env.sandbox
    list_id, partition = _list(small_env, 0)
    _contacts(instance, partition)
    members = sb.mailchimp_list(list_id).members(include_archived=False)
    subscribed = [m for m in members if m["status"] == "subscribed"]
    opted_out = next(m for m in members if m["status"] == "unsubscribed")
    sb.update_member(list_id, subscribed[0]["id"])  # a bump only
    sb.update_member(list_id, opted_out["id"])  # a bump, and timestamp_unsubscribed = last_changed
    sb.delete_member(list_id, subscribed[1]["id"])
    was = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")[opted_out["contact_id"]]
    settle(sb)
    full = _contacts(instance, partition, full_refresh=True)
    assert full["pushed"] == full["accepted"] == 1  # the opted-out member's new timestamp
    assert full["unchanged_skipped"] == full["records"] - 1
    assert full["deleted_in_mailchimp_opted_out"] == 1
    held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
    assert held[subscribed[1]["contact_id"]]["marketing_optin"] == "EXPLICITLY_OPTEDOUT"  # the tombstone
    assert held[opted_out["contact_id"]]["timestamp_unsubscribed"] != was["timestamp_unsubscribed"]
    back = sb.add_member(list_id, subscribed[1]["email_address"])
    settle(sb)
    again = _contacts(instance, partition)
    assert again["pushed"] == 1 and again["unchanged_skipped"] == 0
    assert sb.ometria_contacts("client-1", f"mailchimp-{list_id}")[back["contact_id"]]["marketing_optin"] == (
        "EXPLICITLY_OPTEDIN"
    )
    # push_all: everything again, to repair an account on Ometria's side.
    settle(sb)
    repair = _contacts(instance, partition, full_refresh=True, push_all=True)
    assert repair["push_all"] is True and repair["unchanged_skipped"] == 0
    assert repair["records"] == repair["pushed"] == repair["accepted"] == len(expected_contacts(sb, list_id))
    assert_ometria_matches(sb, partition)


def test_records_refused_after_the_answer_get_no_hash_and_are_pushed_again(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """Ometria's answer counted them accepted; its errors show they failed later: never held."""
    sb = small_env.sandbox
    list_id, partition = _list(small_env, 0)
    sb.state.config.ometria.late_reject_email_pattern = _pattern(
        sb.mailchimp_list(list_id).members(include_archived=False)[:3]
    )
    first = _contacts(instance, partition)
    assert first["failed_after_answer"] == 3 and first["accepted"] == first["records"] - 3
    sb.state.config.ometria.late_reject_email_pattern = None
    settle(sb)
    full = _contacts(instance, partition, full_refresh=True)
    assert full["pushed"] == full["accepted"] == 3 and full["unchanged_skipped"] == full["records"] - 3
    assert_ometria_matches(sb, partition)


def test_a_crash_mid_push_keeps_the_hashes_of_the_accepted_checkpoints(crash_env) -> None:
    """The run is SIGKILLed mid-push; what Ometria accepted up to the last checkpoint is recorded, so
    the re-run pushes only the rest (and those past the checkpoint, again)."""
    env, instance, log = crash_env
    sb = env.sandbox
    (partition,) = env.partition_keys()
    list_id = partition.split(":")[1]
    n = len(expected_contacts(sb, list_id))
    op_config = {"ops": {"ometria__contacts": {"ops": {"import_to_ometria": {"config": {"checkpoint_records": 500}}}}}}
    command = start_materialize(partition, log, "--config-json", json.dumps(op_config))
    # Killed two thirds into the push. A checkpoint is recorded once its errors lookup is in (the data
    # API's 4 a second) while the next records push (25 requests a second here), so recording trails
    # the pushes: on a loaded machine none was recorded yet at 2,500 writes.
    kill_when(command, lambda: sb.ometria_writes("client-1") >= 4000, log)
    at_kill = sb.ometria_writes("client-1")
    assert at_kill < n
    known = PipelineStorage().known_contacts(partition)
    recorded = known.read()
    assert recorded.num_rows % 500 == 0 and 500 <= recorded.num_rows <= at_kill  # whole checkpoints only
    assert recorded.column("hash").null_count == 0
    held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
    assert set(recorded.column("id").to_pylist()) <= set(held)  # recorded only what Ometria holds
    assert len(known.hashes(id_keys).keys) == recorded.num_rows

    rerun = sync(instance, partition)
    assert rerun.success and instance.has_dynamic_partition(MAILCHIMP_LISTS, partition)
    contacts = metadata(rerun, "ometria/contacts")
    assert contacts["unchanged_skipped"] == recorded.num_rows
    assert contacts["pushed"] == n - recorded.num_rows
    assert sb.ometria_writes("client-1") == at_kill + n - recorded.num_rows
    assert_ometria_matches(sb, partition)


def test_the_first_batches_are_judged_once_per_import_not_at_every_checkpoint(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """A systemic rejection is judged on the import's first batches; every later checkpoint only
    looks up its own requests' errors, without stopping the push to judge again (benchmark 2a)."""
    from dagster import materialize

    from mc_pipeline.assets import ASSETS
    from mc_pipeline.definitions import resources
    from mc_pipeline.jobs import sync_run_config

    _, partition = _list(small_env, 1)  # 2,600 members: records are read 1,000 at a time, so
    # checkpoints of 500 fall after 1,000, 2,000 and the last 600: three pushes
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, [partition])
    config = sync_run_config(False, False)
    config.setdefault("ops", {})["ometria__contacts"] = {
        "ops": {"import_to_ometria": {"config": {"checkpoint_records": 500}}}
    }
    result = materialize(ASSETS, partition_key=partition, instance=instance, resources=resources(), run_config=config)
    contacts = metadata(result, "ometria/contacts")
    assert contacts["records"] == 2600 and contacts["requests"] - contacts["retries"] == 26
    assert contacts["error_lookups"] == 3 + 1  # one lookup a checkpoint, one judgement (at each: 3 + 3)


def test_a_full_refresh_of_an_unchanged_list_builds_no_record(
    small_env: LocalEnvironment, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The skip pass costs what changed: unchanged rows are judged by their column-wise hash and never
    become a record (a dict, then bytes); only the changed rows do."""
    from mc_pipeline.assets import ometria

    sb = small_env.sandbox
    list_id, partition = _list(small_env, 0)
    _contacts(instance, partition)
    built: list[int] = []

    def counted(batch: Any) -> list[dict]:
        built.append(batch.num_rows)
        return record_dicts(batch)

    monkeypatch.setattr(ometria, "record_dicts", counted)
    sb.clock.advance(2)
    full = _contacts(instance, partition, full_refresh=True)
    assert full["records"] == full["unchanged_skipped"] > 1000 and full["pushed"] == 0
    assert sum(built) == 0
    member = next(m for m in sb.mailchimp_list(list_id).members(include_archived=False) if m["status"] == "subscribed")
    sb.update_member(list_id, member["id"], merge_fields={"FNAME": "Changed"})
    sb.clock.advance(2)
    incremental = _contacts(instance, partition)
    assert incremental["pushed"] == 1 and sum(built) == 1


def test_hashes_stored_before_the_hash_version_are_unknown_so_each_record_is_pushed_once(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """A store written by the row-wise hash (no `hash_version`: version 1) cannot be compared with
    today's hashes: the next full refresh pushes every record once (and records today's hashes), the
    one after pushes nothing. Never a silent skip on a hash of another kind."""
    sb = small_env.sandbox
    _, partition = _list(small_env, 0)
    first = _contacts(instance, partition)
    for f in PipelineStorage().known_contacts(partition).files():
        table = pq.read_table(f)
        pq.write_table(table.select(["id", "email", "seen", "hash"]), f)  # as version 1 wrote them
    sb.clock.advance(2)
    once = _contacts(instance, partition, full_refresh=True)
    assert once["unchanged_skipped"] == 0 and once["pushed"] == once["accepted"] == first["records"]
    sb.clock.advance(2)
    again = _contacts(instance, partition, full_refresh=True)
    assert again["pushed"] == 0 and again["unchanged_skipped"] == again["records"]
    assert_ometria_matches(sb, partition)


def test_the_next_checkpoint_pushes_while_the_last_lookup_of_the_one_before_is_under_way(
    small_env: LocalEnvironment, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Benchmark 2a: recording a checkpoint does not stall the push. The first part's last errors
    lookup waits here until the second part's first push is sent (order, not timing); that part's
    hashes are recorded only once the lookup is in, and what it finds refused is never held."""
    from dagster import materialize

    from mc_pipeline.assets import ASSETS
    from mc_pipeline.definitions import resources
    from mc_pipeline.jobs import sync_run_config
    from mc_pipeline.resources.ometria import OmetriaClient
    from mc_pipeline.storage import KnownContacts

    sb = small_env.sandbox
    list_id, partition = _list(small_env, 1)  # 2,600 records: parts of 1,000, 1,000 and 600 (10, 10, 6 pushes)
    victims = sb.mailchimp_list(list_id).members(include_archived=False)[500:503]
    sb.state.config.ometria.late_reject_email_pattern = _pattern(victims)
    events: list[tuple[str, int]] = []
    held: list[bool] = []
    changed = threading.Condition()

    def note(kind: str, n: int | None = None, wait_for: tuple[str, int] | None = None) -> None:
        with changed:
            events.append((kind, n if n is not None else 1 + sum(1 for k, _ in events if k == kind)))
            changed.notify_all()
            if wait_for is not None:
                held.append(changed.wait_for(lambda: wait_for in events, timeout=5))

    push, errors_of, add = OmetriaClient.push, OmetriaClient.errors_of, KnownContacts.add

    def traced_push(self: OmetriaClient, *args: Any, **kw: Any) -> Any:
        note("push")
        return push(self, *args, **kw)

    def traced_errors_of(self: OmetriaClient, *args: Any, **kw: Any) -> Any:
        calls = 1 + sum(1 for k, _ in events if k == "lookup")
        note("lookup", calls, ("push", 11) if calls == 2 else None)  # 1: the judgement, 2: the first part's last
        out = errors_of(self, *args, **kw)
        note("looked up", calls)
        return out

    def traced_add(self: KnownContacts, *args: Any, **kw: Any) -> None:
        note("record", kw["part"])
        add(self, *args, **kw)

    monkeypatch.setattr(OmetriaClient, "push", traced_push)
    monkeypatch.setattr(OmetriaClient, "errors_of", traced_errors_of)
    monkeypatch.setattr(KnownContacts, "add", traced_add)
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, [partition])
    config = sync_run_config(False, False)
    config.setdefault("ops", {})["ometria__contacts"] = {
        "ops": {"import_to_ometria": {"config": {"checkpoint_records": 500}}}
    }
    result = materialize(ASSETS, partition_key=partition, instance=instance, resources=resources(), run_config=config)
    assert held == [True]  # the second part pushed while the first part's last lookup was under way
    assert events.index(("looked up", 2)) < events.index(("record", 0))  # recorded once its errors are in
    contacts = metadata(result, "ometria/contacts")
    assert contacts["records"] == 2600 and contacts["requests"] - contacts["retries"] == 26
    assert contacts["error_lookups"] == 4 and contacts["failed_after_answer"] == 3
    sent = pq.read_table(RunFolder(Path(contacts["run_folder"])).contacts, columns=["id"]).column("id").to_pylist()
    assert any(300 <= sent.index(v["contact_id"]) < 1000 for v in victims)  # found by that very lookup
    known = set(
        PipelineStorage(data_dir=str(small_env.data_dir)).known_contacts(partition).read().column("id").to_pylist()
    )
    assert len(known) == 2600 - 3 and not set(known) & {v["contact_id"] for v in victims}
