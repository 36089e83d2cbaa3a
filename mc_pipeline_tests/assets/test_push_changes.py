"""Push only what changed (issue 11, item 4), end to end against the sandbox: a record Ometria last
accepted byte for byte is skipped, a `last_changed` bump alone costs no push, a full refresh of an
unchanged list pushes nothing but tombstones, `push_all` pushes everything, and a crash mid-push
keeps what Ometria had accepted by the last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from dagster import DagsterInstance

from mc_pipeline.local import LocalEnvironment, sandbox_environment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.sandbox import SandboxConfig
from mc_pipeline.staging import id_keys
from mc_pipeline.storage import PipelineStorage
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
    kill_when(command, lambda: sb.ometria_writes("client-1") >= 2500, log)
    at_kill = sb.ometria_writes("client-1")
    assert at_kill < n
    known = PipelineStorage().known_contacts(partition)
    recorded = known.read()
    assert recorded.num_rows % 500 == 0 and 2000 <= recorded.num_rows <= at_kill  # whole checkpoints only
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
