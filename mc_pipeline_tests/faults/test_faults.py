"""Every fault the APIs produce ends in a correct import or a loud, specific failure; re-runs converge.

Each test states the fault, what the pipeline must do, and what the sandbox's Ometria must hold.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance

from mc_pipeline.assets.watermarks import latest_watermark
from mc_pipeline.local import LocalEnvironment, sandbox_environment
from mc_pipeline.resources import MailchimpResource, OmetriaResource
from mc_pipeline.sandbox import Faults, Latency, SandboxConfig
from mc_pipeline_tests.helpers import (
    assert_ometria_matches,
    expected_contacts,
    failed_at_once,
    metadata,
    set_ometria_rate,
    settle,
    step_failure_message,
    sync,
)

FAST = {
    "mailchimp": MailchimpResource(backoff_base_s=0.02, backoff_cap_s=0.2, read_timeout_s=1.0, max_attempts=8),
    "ometria": OmetriaResource(backoff_base_s=0.02, backoff_cap_s=0.2, read_timeout_s=1.0, max_attempts=8),
}


def test_mailchimp_faults_are_retried_and_every_member_arrives(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """429, 500/503, 504, dropped connections, cut JSON and answers slower than the timeout."""
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]
    sb.set_fault_rates(
        list_id,
        Faults(
            error_rate=0.1,
            gateway_timeout_rate=0.05,
            drop_rate=0.05,
            truncate_rate=0.05,
            slow_rate=0.05,
            gateway_delay_s=0.05,
            slow_delay_s=1.5,
        ),
    )
    sb.script_faults(list_id, ["429", "403_throttle", "slow", "truncate", "drop", "500", "503", "504"])
    result = sync(instance, f"client-1:{list_id}", overrides=FAST)
    pages = metadata(result, "mailchimp/member_pages")
    assert pages["retries"] >= 8 and pages["throttled"] >= 2
    assert_ometria_matches(sb, f"client-1:{list_id}")


@pytest.mark.slow
def test_ometria_faults_are_retried_without_storing_anything_twice(tmp_path: Path, instance: DagsterInstance) -> None:
    """429 (rate and backlog), 5xx, a dropped answer and a timeout after the batch was stored."""
    config = SandboxConfig.generated(clients=1, lists_per_client=1, members=3000)
    config.ometria.backlog_limit = 600
    config.ometria.drain_per_second = 1500
    with sandbox_environment(config, tmp_path / "work") as env:
        sb = env.sandbox
        partition = env.partition_keys()[0]
        sb.set_fault_rates("client-1", Faults(error_rate=0.1, drop_rate=0.05, slow_rate=0.05, slow_delay_s=1.5))
        sb.script_faults("client-1", ["store_then_drop", "store_then_slow", "429", "500", "503", "504"])
        result = sync(instance, partition, overrides=FAST)
        contacts = metadata(result, "ometria/contacts")
        expected = expected_contacts(sb, env.sandbox.client("client-1").list_ids[0])
        assert contacts["retries"] >= 6 and contacts["throttled_429"] >= 1
        assert contacts["accepted"] == len(expected) and contacts["rejected"] == 0
        assert_ometria_matches(sb, partition)  # nothing missing...
        assert len(sb.ometria_contacts("client-1")) == len(expected)  # ...nothing twice
        assert sb.ometria_writes("client-1") > len(expected)  # though some batches were written twice


def test_a_bad_key_fails_that_list_at_once_and_no_other_client(tmp_path: Path, instance: DagsterInstance) -> None:
    config = SandboxConfig.generated(clients=2, lists_per_client=1, members=800)
    with sandbox_environment(config, tmp_path / "work") as env:
        sb = env.sandbox
        bad, good = env.partition_keys()
        sb.revoke("client-1", "mailchimp")
        failed = sync(instance, bad, raise_on_error=False, overrides=FAST)
        assert not failed.success
        message = step_failure_message(failed)
        assert f"Mailchimp client 'client-1', list {bad.split(':')[1]}: 403 User Disabled" in message
        assert failed_at_once(env)  # no retry storm
        assert sync(instance, good, overrides=FAST).success
        assert_ometria_matches(sb, good)
        assert sb.ometria_contacts("client-1") == {}


def test_a_deleted_list_fails_at_once(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[0]
    del sb.state.mc_by_client["client-1"].lists[list_id]  # the audience was deleted in Mailchimp
    failed = sync(instance, f"client-1:{list_id}", raise_on_error=False, overrides=FAST)
    assert f"list {list_id}: 404 Resource Not Found" in step_failure_message(failed)
    assert failed_at_once(small_env)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("402", "402 Quota exceeded"), ("revoked", "403 Forbidden")],
)
def test_ometria_refusals_stop_the_import_and_keep_the_watermark(
    small_env: LocalEnvironment, instance: DagsterInstance, fault: str, expected: str
) -> None:
    sb = small_env.sandbox
    set_ometria_rate(small_env, 8, 8)  # at 100 a second, a second batch may leave before the refusal is back
    list_id = sb.client("client-1").list_ids[1]
    partition = f"client-1:{list_id}"
    sync(instance, partition, overrides=FAST)
    watermark = latest_watermark(instance, partition)
    sb.add_member(list_id, "late.comer@example.org")
    settle(sb)
    if fault == "revoked":
        sb.revoke("client-1", "ometria")
    else:
        sb.script_faults("client-1", [fault])
    sb.reset_stats()
    failed = sync(instance, partition, raise_on_error=False, overrides=FAST)
    assert expected in step_failure_message(failed)
    assert sb.stats("ometria:client-1")["requests"] == 1  # stopped at the first refusal
    assert latest_watermark(instance, partition) == watermark
    sb.revoke("client-1", "ometria", revoked=False)
    assert sync(instance, partition, overrides=FAST).success  # the next run converges
    assert_ometria_matches(sb, partition)


def test_rejected_records_become_dead_letters_below_the_threshold(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]
    partition = f"client-1:{list_id}"
    victims = random.Random(7).sample(sb.mailchimp_list(list_id).members(include_archived=False), 3)
    pattern = "|".join(f"^{m['email_address'].replace('.', r'[.]').replace('+', r'[+]')}$" for m in victims)
    sb.state.config.ometria.reject_email_pattern = pattern  # Ometria refuses these three
    result = sync(instance, partition, overrides=FAST)
    contacts = metadata(result, "ometria/contacts")
    assert contacts["rejected"] == 3 and contacts["dead_letters"] == 3
    assert contacts["accepted"] == contacts["records"] - 3
    assert contacts["resent_to_isolate_rejections"] == 0  # Ometria's errors say which: nothing is sent twice
    assert contacts["requests"] == -(-contacts["records"] // 100)
    dead = pq.read_table(Path(contacts["run_folder"]) / "dead_letters-import.parquet").to_pylist()
    assert {d["record_id"] for d in dead} == {m["contact_id"] for m in victims}
    assert all("refused by this account's rules" in d["reason"] for d in dead)
    held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
    assert len(held) == len(expected_contacts(sb, list_id)) - 3


@pytest.mark.slow
def test_members_changed_during_a_long_full_sync_are_not_missed(tmp_path: Path, instance: DagsterInstance) -> None:
    """The list changes while a slow full sync pages through it; the next incremental catches up."""
    config = SandboxConfig.generated(clients=1, lists_per_client=1, members=6000)
    config.mailchimp.latency = Latency(base_ms=60)
    with sandbox_environment(config, tmp_path / "work") as env:
        set_ometria_rate(env)  # the subject is the paging: pushes need not wait on Ometria's 8 a second
        sb = env.sandbox
        partition = env.partition_keys()[0]
        list_id = partition.split(":")[1]
        members = sb.mailchimp_list(list_id).members(include_archived=False)
        rng = random.Random(3)
        stop = threading.Event()
        changed = []

        def churn() -> None:
            i = 0
            while not stop.is_set():
                m = rng.choice(members)
                action = i % 4
                if action == 0:
                    sb.add_member(list_id, f"during.sync.{i}@example.org")
                elif action == 1:
                    sb.update_member(list_id, m["id"], merge_fields={"LNAME": f"changed {i}"})
                elif action == 2:
                    sb.set_status(list_id, m["id"], "unsubscribed")
                else:
                    sb.set_status(list_id, m["id"], "archived")
                changed.append(i)
                i += 1
                time.sleep(0.005)

        thread = threading.Thread(target=churn)
        thread.start()
        try:
            full = sync(instance, partition, overrides={"mailchimp": MailchimpResource(page_size=250)})
        finally:
            stop.set()
            thread.join()
        assert len(changed) > 20
        pages = metadata(full, "mailchimp/member_pages")
        assert pages["total_items"] >= pages["total_items_at_end"]
        settle(sb)
        sync(instance, partition)
        assert_ometria_matches(sb, partition)


def test_dead_letters_are_listed_and_replayed_after_a_fix(
    small_env: LocalEnvironment, instance: DagsterInstance, capsys: pytest.CaptureFixture[str]
) -> None:
    from mc_pipeline.cli import main

    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]
    partition = f"client-1:{list_id}"
    victims = random.Random(11).sample(sb.mailchimp_list(list_id).members(include_archived=False), 4)
    sb.state.config.ometria.reject_email_pattern = "|".join(
        f"^{m['email_address'].replace('.', r'[.]').replace('+', r'[+]')}$" for m in victims
    )
    sync(instance, partition, overrides=FAST)
    assert main(["dead-letters", "list", partition]) == 0
    listed = capsys.readouterr().out
    assert "4 dead letters" in listed and "refused by this account's rules" in listed
    assert victims[0]["email_address"] not in listed  # masked

    assert main(["dead-letters", "replay", partition]) == 1  # the rule is still there: nothing passes
    assert "4 still failing" in capsys.readouterr().out
    sb.state.config.ometria.reject_email_pattern = None  # the fix: Ometria's rule is lifted
    assert main(["dead-letters", "replay", partition]) == 0
    assert "pushed 4, 4 accepted, 0 refused by Ometria" in capsys.readouterr().out
    assert_ometria_matches(sb, partition)
    assert main(["dead-letters", "list", partition]) == 0
    assert "no dead letters" in capsys.readouterr().out
