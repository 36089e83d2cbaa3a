"""Dead letters: kept whole, outstanding per list across runs (and pruning), judged per list, replayed."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from mc_pipeline import dead_letters as dl
from mc_pipeline.cli import main
from mc_pipeline.storage import PipelineStorage

PARTITION = "acme:0123456789"
M1, M2, M3 = "1" * 32, "2" * 32, "3" * 32


def letter(stage: str, member: str | None, record: str | None, reason: str, payload: object) -> dict:
    return dl.dead_letter(stage, member, record, reason, payload)


def big_record(email: str = "olivia.jones@example.org") -> dict:
    """An Ometria record of about 6 KB: over the 4 KB at which payloads used to be cut."""
    return {"@type": "contact", "id": "c" * 32, "email": email, "properties": {"NOTES": "é\\" * 3000}}


@pytest.fixture
def storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PipelineStorage:
    monkeypatch.setenv("MC_PIPELINE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("MC_PIPELINE_CLIENTS", raising=False)
    return PipelineStorage()


def test_a_payload_is_kept_whole_and_a_reason_names_no_address() -> None:
    row = letter("import", None, "c" * 32, "Ometria: Field 'email' refused: 'olivia.jones@example.org'", big_record())
    table = dl.as_table([row])
    assert orjson.loads(table.column("payload")[0].as_py()) == big_record()  # was cut at 4096 characters
    assert table.column("reason")[0].as_py() == "Ometria: Field 'email' refused: '<email>'"


def test_the_run_preview_shows_each_reason_whole(tmp_path: Path) -> None:
    reason = "Ometria: Field 'properties.NOTES' is longer than the 1,024 characters allowed; " * 3
    dl.write_run_file(tmp_path, "import", [letter("import", None, "c" * 32, reason, big_record())])
    preview = dl.run_metadata(tmp_path, dl.read_run(tmp_path))["dead_letter_preview"].value
    assert reason.strip() in preview and "ol***@example.org" in preview  # was cut at 80 characters


def test_listing_shows_any_dead_letter_even_one_cut_by_an_older_version(storage: PipelineStorage, capsys) -> None:
    whole = letter("import", None, "c" * 32, "Ometria: refused", big_record())
    cut = whole | {"record_id": "d" * 32, "payload": whole["payload"][:4096]}  # as the old code stored it
    dl.outstanding(storage, PARTITION).record("run1", dl.as_table([whole, cut]), None, full_refresh=False)
    assert main(["dead-letters", "list", PARTITION]) == 0  # the old CLI died here with a JSONDecodeError
    out = capsys.readouterr().out
    assert "2 dead letters" in out and out.count("ol***@example.org") == 2
    assert "olivia.jones" not in out


def test_outstanding_dead_letters_are_carried_across_runs_and_cleared_by_an_import(storage: PipelineStorage) -> None:
    store = dl.outstanding(storage, PARTITION)
    store.record("run1", dl.as_table([letter("transform", M1, "a" * 32, "email missing", {"x": 1})]), None, False)
    store.record("run2", dl.as_table([letter("import", None, "b" * 32, "Ometria: no", {"id": "b" * 32})]), None, False)
    assert store.read().num_rows == 2
    # run 3 imports member 1 (fixed in Mailchimp) and dead-letters a member without an id, twice over
    imported = pa.table({"member_id": [M1], "id": ["a" * 32]})
    no_id = letter("staging", None, None, "member without an id", {"email_address": "x@y.z"})
    store.record("run3", dl.as_table([no_id]), imported, False)
    store.record("run4", dl.as_table([no_id]), pa.table({"member_id": [M2], "id": ["e" * 32]}), False)
    left = store.read().to_pylist()
    assert [(r["record_id"], r["reason"], r["run_id"]) for r in left] == [
        ("b" * 32, "Ometria: no", "run2"),
        (None, "member without an id", "run4"),  # the same member is one dead letter, not two
    ]
    # a full refresh saw every member: what it did not dead-letter again is through or gone
    store.record("run5", dl.as_table([letter("transform", M3, None, "no stable id", {})]), None, True)
    assert [r["member_id"] for r in store.read().to_pylist()] == [M3]


def test_pruning_keeps_outstanding_dead_letters(storage: PipelineStorage) -> None:
    for run in ("r1", "r2", "r3"):
        storage.run_folder(PARTITION, run)
    dl.write_run_file(storage.run_folder(PARTITION, "r1").root, "import", [letter("import", None, "b" * 32, "no", {})])
    dl.outstanding(storage, PARTITION).record("r1", dl.read_run(storage.run_folder(PARTITION, "r1").root), None, False)
    os.utime(storage.run_folder(PARTITION, "r1").root, (1, 1))  # the oldest
    assert "r1" in PipelineStorage(keep_runs=1).prune(PARTITION)
    assert dl.outstanding(storage, PARTITION).read().num_rows == 1


def test_the_share_is_of_the_list_and_the_alert_names_them(storage: PipelineStorage) -> None:
    storage.known_contacts(PARTITION).add("r1", pa.table({"id": [f"{i:032x}" for i in range(36)], "email": ["e"] * 36}))
    rows = [
        letter("import", None, f"{i:032x}", "Ometria: refused", {"email": f"person{i}@example.org"})
        for i in range(34, 39)  # two of them known before (changed since), three never taken
    ]
    pending = dl.outstanding(storage, PARTITION).record("r2", dl.as_table(rows), None, False)
    state = dl.state_of(pending, storage, PARTITION, limit=0.1)
    assert (state.outstanding, state.members) == (5, 39)
    assert not state.passed and state.share == pytest.approx(5 / 39)
    text = state.describe()
    assert text and "5 outstanding dead letters, 12.8% of the list's 39 members" in text
    assert "pe***@example.org (Ometria: refused)" in text and "person34" not in text
    assert dl.state_of(pending, storage, PARTITION, limit=0.2).describe() is None


def test_a_dry_run_plans_what_the_replay_does() -> None:
    staged = {"member_id": M1, "email_address": "a@example.org", "contact_id": "a" * 32, "status": "subscribed"}
    rows = [
        letter("transform", M1, "a" * 32, "email missing or not a valid address", staged),  # now passes
        letter("transform", M2, None, "no stable id", staged | {"member_id": M2, "contact_id": None}),
        letter("staging", None, None, "member without an id", {"email_address": "x@y.z"}),
        letter("import", None, "c" * 32, "Ometria: refused", big_record()),
        letter("import", None, "d" * 32, "Ometria: refused", big_record() | {"properties": {"N": "\\" * 40_000}}),
    ]
    rows.append(rows[3] | {"record_id": "e" * 32, "payload": rows[3]["payload"][:4096]})
    plan = dl.plan(dl.as_table(rows).to_pylist(), "mailchimp-0123456789")
    assert [r["id"] for r in plan.records] == ["a" * 32, "c" * 32]
    reasons = {r["reason"].split(" (")[0]: r["reason"] for r in plan.failing}
    assert reasons.keys() == {
        "Ometria: refused",  # the payload cut by an older version: not readable, a full refresh fetches it again
        "record over Ometria's 60 KB limit",
        "member without an id",
        "no stable id: contact_id and unique_email_id are empty",
    }
    assert "payload not readable" in reasons["Ometria: refused"]
    sent = len(orjson.dumps(big_record() | {"properties": {"N": "\\" * 40_000}}))  # 40,000 characters, 80,000 bytes
    assert f"({sent} bytes as sent)" in reasons["record over Ometria's 60 KB limit"]


def test_an_unknown_or_never_synced_partition_is_said_so(
    storage: PipelineStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from dagster import instance_for_test

    assert main(["dead-letters", "list", PARTITION]) == 0
    assert "never synced" in capsys.readouterr().out  # was: "no dead letters"
    registry = tmp_path / "clients.yaml"
    registry.write_text(
        "clients:\n  - id: acme\n    mailchimp: {api_key: {env: K1}}\n    ometria: {api_key: {env: K2}}\n"
        "    lists: [1a2d7ebf82]\n"
    )
    monkeypatch.setenv("MC_PIPELINE_CLIENTS", str(registry))
    assert main(["dead-letters", "list", "other:1a2d7ebf82"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["dead-letters", "replay", "--dry-run", PARTITION]) == 2
    assert "list 0123456789 is not a list of client 'acme'" in capsys.readouterr().err
    assert main(["dead-letters", "list", "acme:not-a-list"]) == 2
    (tmp_path / "home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "home")):
        assert main(["dead-letters", "list", "acme:1a2d7ebf82"]) == 2
        assert "not a partition of mailchimp_lists" in capsys.readouterr().err


@pytest.mark.slow
def test_an_incremental_of_half_bad_members_moves_on_and_the_check_names_them_until_replayed(
    tmp_path: Path, instance, capsys
) -> None:
    """Five of ten changed members refused: the watermark moves, the next incremental fetches
    nothing again, the check fails naming them (whatever pruning removed), a replay after the fix
    clears them and the check passes."""
    from mc_pipeline.assets.checks import counts_reconcile
    from mc_pipeline.assets.watermarks import latest_watermark
    from mc_pipeline.automation.checks import dead_letter_state, dead_letters_within_share
    from mc_pipeline_tests.conftest import make_env
    from mc_pipeline_tests.helpers import assert_ometria_matches, metadata, sync

    def verdict(result):
        return next(c for c in result.get_asset_check_evaluations() if c.check_name == dl.CHECK_NAME)

    with make_env(tmp_path, clients=1, lists_per_client=1, members=[40]) as env:  # type: ignore[attr-defined]
        sb = env.sandbox
        partition = env.partition_keys()[0]
        list_id = partition.split(":")[1]
        kw = {
            "checks": (counts_reconcile, dead_letters_within_share),
            "overrides": {"storage": PipelineStorage(keep_runs=1)},
        }
        assert verdict(sync(instance, partition, **kw)).passed
        changed = sb.mailchimp_list(list_id).members(include_archived=False)[:10]
        bad = changed[:5]
        sb.state.config.ometria.reject_email_pattern = "|".join(
            f"^{m['email_address'].replace('.', r'[.]').replace('+', r'[+]')}$" for m in bad
        )
        for m in changed:
            sb.update_member(list_id, m["id"], merge_fields={"LNAME": "Changed"})
        sb.clock.advance(2)  # the changes fall inside the next window
        watermark = latest_watermark(instance, partition)

        incremental = sync(instance, partition, **kw)  # 50% of the window: the old code failed the run here
        assert incremental.success and latest_watermark(instance, partition) > watermark
        contacts = metadata(incremental, "ometria/contacts")
        assert (contacts["records"], contacts["rejected"], contacts[dl.OUTSTANDING], contacts["list_members"]) == (
            10,
            5,
            5,
            40,
        )
        check = verdict(incremental)
        assert not check.passed and check.description
        assert "5 outstanding dead letters, 12.5% of the list's 40 members" in check.description
        for m in bad:
            local, domain = m["email_address"].split("@")
            assert f"{local[:2]}***@{domain}" in check.description and m["email_address"] not in check.description
        assert "refused by this account's rules" in check.description

        sb.clock.advance(2)
        sb.reset_stats()
        again = sync(instance, partition, **kw)  # nothing is fetched again; the run folder above is pruned
        assert metadata(again, "mailchimp/member_pages")["members"] == 0
        assert sb.stats("ometria:client-1")["requests"] == 0
        assert not verdict(again).passed and metadata(again, "ometria/contacts")[dl.OUTSTANDING] == 5
        assert main(["dead-letters", "list", partition]) == 0
        assert "5 dead letters" in capsys.readouterr().out

        sb.state.config.ometria.reject_email_pattern = None  # the fix
        assert main(["dead-letters", "replay", "--dry-run", partition]) == 0
        assert "5 dead letters: would push 5, 0 fail conversion or validation" in capsys.readouterr().out
        assert main(["dead-letters", "replay", partition]) == 0
        assert "5 dead letters: pushed 5, 5 accepted, 0 refused by Ometria, 0 fail" in capsys.readouterr().out
        assert dead_letter_state(instance, partition)[dl.OUTSTANDING] == 0  # recorded in Dagster by the replay
        assert_ometria_matches(sb, partition)
        sb.clock.advance(2)
        final = sync(instance, partition, **kw)
        assert verdict(final).passed and metadata(final, "ometria/contacts")[dl.OUTSTANDING] == 0
