"""What Ometria refuses, end to end against the sandbox: caught before the push where documented,
isolated within a budget where not, tied to its own record, found after the answer, and a
systemic rejection or a refusal of the key stops the import at once."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from dagster import DagsterInstance

from mc_pipeline.local import LocalEnvironment
from mc_pipeline.resources import MailchimpResource, OmetriaResource
from mc_pipeline.resources.ometria_push import JUDGE_AHEAD
from mc_pipeline.storage import PipelineStorage, RunFolder
from mc_pipeline_tests.helpers import (
    expected_contacts,
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


def _list(env: LocalEnvironment, n: int = 1) -> tuple[str, str]:
    list_id = env.sandbox.client("client-1").list_ids[n]
    return list_id, f"client-1:{list_id}"


def _pattern(members: list[dict[str, Any]]) -> str:
    return "|".join(f"^{m['email_address'].replace('.', r'[.]').replace('+', r'[+]')}$" for m in members)


def _dead(contacts: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(contacts["run_folder"]) / "dead_letters-import.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else []


def test_a_record_too_large_only_once_serialized_is_a_dead_letter_and_its_batch_mates_arrive(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """Item 1: 31,000 quotes are 31 KB of text and 62 KB as sent; the estimate let it through,
    Ometria refused the whole batch with a 400, and every later run failed the same way."""
    sb = small_env.sandbox
    list_id, partition = _list(small_env, 0)
    big = sb.add_member(list_id, "quoted@example.org", merge_fields={"FNAME": '"' * 31_000})
    settle(sb)  # the change is older than the window's end
    for full_refresh in (False, True):  # and the next full run too: the list is not wedged
        contacts = metadata(sync(instance, partition, full_refresh=full_refresh, overrides=FAST), "ometria/contacts")
        dead = _dead(contacts)
        assert [d["record_id"] for d in dead] == [big["contact_id"]], (full_refresh, str(contacts))
    assert "60 KB limit" in dead[0]["reason"] and "bytes as sent" in dead[0]["reason"]
    held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
    assert set(held) == set(expected_contacts(sb, list_id)) - {big["contact_id"]}
    assert contacts["resent_to_isolate_rejections"] == 0  # caught before the push: no request refused


def test_a_batch_refused_as_a_whole_is_isolated_and_the_others_arrive(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """Item 1, a rule the client does not know (Ometria's record limit lowered to 4 KiB): the
    request is refused as a whole, the bad member becomes a dead letter, the rest arrive."""
    sb = small_env.sandbox
    list_id, partition = _list(small_env, 0)
    middle = sb.mailchimp_list(list_id).members(include_archived=False)[500]
    big = sb.update_member(list_id, middle["id"], merge_fields={"NOTES": "n" * 6000})
    settle(sb)
    sb.state.config.ometria.max_record_bytes = 4096
    result = sync(instance, partition, overrides=FAST)
    contacts = metadata(result, "ometria/contacts")
    dead = _dead(contacts)
    assert [d["record_id"] for d in dead] == [big["contact_id"]]
    assert "Record is too large" in dead[0]["reason"]
    held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
    assert set(held) == set(expected_contacts(sb, list_id)) - {big["contact_id"]}
    assert 1 <= contacts["resent_to_isolate_rejections"] <= 14


def test_each_rejection_is_tied_to_its_own_record(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    """Item 5 and the budget of item 3: 26 rejected records spread over 26 batches pushed by 4
    threads; each dead letter carries its own record's reason, and no request is sent twice."""
    sb = small_env.sandbox
    list_id, partition = _list(small_env, 1)
    members = sb.mailchimp_list(list_id).members(include_archived=False)
    victims = random.Random(5).sample(members, 26)
    sb.state.config.ometria.reject_email_pattern = _pattern(victims)
    contacts = metadata(sync(instance, partition, overrides=FAST), "ometria/contacts")
    dead = {d["record_id"]: d["reason"] for d in _dead(contacts)}
    assert set(dead) == {v["contact_id"] for v in victims}
    sent = pq.read_table(RunFolder(Path(contacts["run_folder"])).contacts, columns=["id"]).column("id").to_pylist()
    for v in victims:  # each reason names its own record's place in its request of 100
        assert dead[v["contact_id"]].endswith(f"at [{sent.index(v['contact_id']) % 100}].email")
    batches = -(-contacts["records"] // 100)
    assert contacts["requests"] == batches and contacts["resent_to_isolate_rejections"] == 0
    assert contacts["error_lookups"] <= 2  # the first batches' judgement, then the other 23 requests


def test_records_failing_validation_after_the_answer_are_dead_letters_not_known(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """Item 17: the answer counts them accepted; Ometria's errors show they failed later."""
    sb = small_env.sandbox
    list_id, partition = _list(small_env, 1)
    victims = random.Random(9).sample(sb.mailchimp_list(list_id).members(include_archived=False), 3)
    sb.state.config.ometria.late_reject_email_pattern = _pattern(victims)
    result = sync(instance, partition, overrides=FAST)
    assert all(e.passed for e in result.get_asset_check_evaluations())  # the counts reconcile
    contacts = metadata(result, "ometria/contacts")
    assert contacts["failed_after_answer"] == 3
    assert contacts["accepted"] == contacts["records"] - 3 and contacts["dead_letters"] == 3
    dead = _dead(contacts)
    assert {d["record_id"] for d in dead} == {v["contact_id"] for v in victims}
    assert all("failed validation while processing" in d["reason"] for d in dead)
    known = set(
        PipelineStorage(data_dir=str(small_env.data_dir)).known_contacts(partition).read().column("id").to_pylist()
    )
    assert known and not known & {v["contact_id"] for v in victims}


def test_a_systemic_rejection_stops_the_import_within_the_first_batches(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """Item 3: every record refused (a changed rule): one failure naming the cause after 3 batches,
    not an hour of halving. The same when the refusal comes only after the answers. While the first
    3 are judged (their answers, then one lookup), at most `JUDGE_AHEAD` more are pushed, not the push."""
    sb = small_env.sandbox
    list_id, partition = _list(small_env, 1)
    for setting in ("reject_email_pattern", "late_reject_email_pattern"):
        setattr(sb.state.config.ometria, setting, r"@")
        sb.reset_stats()
        failed = sync(instance, partition, raise_on_error=False, overrides=FAST)
        setattr(sb.state.config.ometria, setting, None)
        message = step_failure_message(failed)
        assert f"Ometria client 'client-1', list {list_id}" in message, message
        assert "systemic rejection" in message and "of the first 3 batches" in message, message
        assert "Field 'email'" in message and "at .email" in message, message
        assert "@" not in message.split("Ometria said:")[1]  # no address in the alert
        assert 3 <= sb.stats("ometria:client-1")["requests"] <= 3 + JUDGE_AHEAD


def test_the_first_refusal_stops_every_push_of_the_account(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """Item 4: a 402 on the first request of a 26-batch push; no other batch is sent after it."""
    sb = small_env.sandbox
    set_ometria_rate(small_env, 8, 8)  # at 100 a second, a second batch may leave before the 402 is back
    _, partition = _list(small_env, 1)
    sb.script_faults("client-1", ["402"])
    failed = sync(instance, partition, raise_on_error=False, overrides=FAST)
    assert "402 Quota exceeded" in step_failure_message(failed)
    assert sb.stats("ometria:client-1")["requests"] == 1
    assert sb.ometria_contacts("client-1") == {}
