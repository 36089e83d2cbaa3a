"""Counts mean what they say: rows, the pages' overlap and distinct members apart, reconciled exactly,
and `counts_reconcile` fails on a real loss only, naming the member."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from dagster import DagsterInstance

from mc_pipeline.demo import run_figures
from mc_pipeline.local import LocalEnvironment, sandbox_environment
from mc_pipeline.sandbox import SandboxConfig
from mc_pipeline_tests.helpers import assert_ometria_matches, metadata, set_ometria_rate, sync


def _warnings(instance: DagsterInstance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if e.level >= logging.WARNING]


@pytest.mark.slow
def test_a_static_list_of_100000_members_with_4000_archived_reconciles(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    config = SandboxConfig.generated(clients=1, lists_per_client=1, members=100_000)
    config.ometria.backlog_limit = 1_000_000
    config.ometria.drain_per_second = 1_000_000
    with sandbox_environment(config, tmp_path / "work") as env:
        set_ometria_rate(env)  # the push rate is not what this tests
        sb = env.sandbox
        (partition,) = env.partition_keys()
        list_id = partition.split(":")[1]
        everyone = sb.mailchimp_list(list_id).members(include_archived=True)
        listed = sb.mailchimp_list(list_id).members(include_archived=False)
        archived = len(everyone) - len(listed)
        assert len(everyone) == 100_000 and 3_800 <= archived <= 4_200  # 4% of the generated members

        result = sync(instance, partition)
        assert result.success
        pages = metadata(result, "mailchimp/member_pages")
        assert pages["members"] == pages["total_items"] == len(listed)
        assert pages["archived_members"] == pages["archived_total_items"] == archived
        member_pages = 1 + len(range(980, len(listed), 980))
        archived_pages = 1 + len(range(980, archived, 980))
        assert pages["pages"] == member_pages + archived_pages
        assert pages["overlap_rows"] == 20 * (member_pages - 1 + archived_pages - 1)
        assert pages["rows_fetched"] == len(everyone) + pages["overlap_rows"]
        staged = metadata(result, "mailchimp/members")
        assert staged["dagster/row_count"] == len(everyone)
        assert staged["overlap_duplicates"] == pages["overlap_rows"] and staged["changed_duplicates"] == 0
        assert staged["rows_read"] == pages["rows_fetched"]
        assert not [w for w in _warnings(instance, result.run_id) if "paged" in w or "changed" in w]
        (check,) = result.get_asset_check_evaluations()
        assert check.passed, check.description
        assert_ometria_matches(sb, partition)
        figures = run_figures(instance, result.run_id, partition, "full")  # the demo's table
        assert figures.members == len(everyone) and figures.archived == archived


def _drop_one_staged_row(monkeypatch: pytest.MonkeyPatch, page_offset: int, row: int) -> list[str]:
    """A staging bug: one member of the page at `page_offset` never reaches the table. Returns its id."""
    from mc_pipeline import staging

    original, dropped = staging.parse_page, []

    def lossy(raw: bytes, offset: int = 0):
        table, dead = original(raw, offset)
        if offset == page_offset and not dropped and table.num_rows > row:
            dropped.append(table.column("member_id")[row].as_py())
            table = table.filter(pa.array([i != row for i in range(table.num_rows)]))
        return table, dead

    monkeypatch.setattr(staging, "parse_page", lossy)
    return dropped


def test_a_member_lost_in_staging_fails_the_check_naming_it(
    small_env: LocalEnvironment, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    list_id = small_env.sandbox.client("client-1").list_ids[1]  # members on pages at 0, 980, 1960
    dropped = _drop_one_staged_row(monkeypatch, 980, 500)  # not in the overlap: nowhere else
    result = sync(instance, f"client-1:{list_id}")
    (check,) = result.get_asset_check_evaluations()
    assert dropped and not check.passed
    assert "rows fetched but" in check.description and f"missing members: {dropped[0]}" in check.description
    assert check.metadata["missing_members"].value == dropped


def test_a_member_lost_in_the_overlap_is_not_missing_but_the_counts_say_so(
    small_env: LocalEnvironment, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropped where the next page has it too: no member lost, yet a step lost a row, which the check reports."""
    list_id = small_env.sandbox.client("client-1").list_ids[1]
    _drop_one_staged_row(monkeypatch, 980, 990)  # position 1970: also on the page at 1960
    result = sync(instance, f"client-1:{list_id}")
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and "rows fetched but" in check.description
    assert check.metadata["missing_members"].value == []
    assert_ometria_matches(small_env.sandbox, f"client-1:{list_id}")


def test_a_contact_lost_in_the_transform_fails_the_check_naming_it(
    small_env: LocalEnvironment, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mc_pipeline.assets import ometria

    original, dropped = ometria.to_contacts, []

    def lossy(staged, *args, **kwargs):
        good, dead = original(staged, *args, **kwargs)
        if not dropped and good.num_rows:
            dropped.append(good.column("member_id")[0].as_py())
            good = good.slice(1)
        return good, dead

    monkeypatch.setattr(ometria, "to_contacts", lossy)
    list_id = small_env.sandbox.client("client-1").list_ids[0]
    result = sync(instance, f"client-1:{list_id}")
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and "members staged but" in check.description
    assert check.metadata["missing_members"].value == dropped


def test_a_list_that_changes_while_it_is_paged_passes_the_check(
    small_env: LocalEnvironment, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members added, changed, unsubscribed and archived after every page: no false alarm, and a
    WARNING only when a member was read in two versions."""
    from mc_pipeline.resources.mailchimp import MailchimpClient, MailchimpResource

    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]
    pool = sb.mailchimp_list(list_id).members(include_archived=False)
    original, done, archived_one = MailchimpClient._page, [0], threading.Event()
    original_open = MailchimpClient._open

    def page_then_change(self, list_id_, offset, window, stats):
        page = original(self, list_id_, offset, window, stats)
        if offset == 0 and not done[0]:
            # Archived once read: it is then also in the archived sweep (which starts after this page
            # and whose window ends a second before its own start), in its new version.
            sb.set_status(list_id, orjson.loads(page.raw)["members"][0]["id"], "archived")
            sb.clock.advance(2)
            archived_one.set()
        if window.get("status") is None and done[0] < 60:  # the members sweep, not the archived one
            for _ in range(3):
                i = done[0] = done[0] + 1
                m = pool[i * 37 % len(pool)]
                if i % 4 == 0:
                    sb.add_member(list_id, f"during.sync.{i}@example.org")
                elif i % 4 == 1:
                    sb.update_member(list_id, m["id"], merge_fields={"LNAME": f"changed {i}"})
                elif i % 4 == 2:
                    sb.set_status(list_id, m["id"], "unsubscribed")
                else:
                    sb.set_status(list_id, m["id"], "archived")
        return page

    def open_after_the_archive(self, list_id_, status, *args, **kwargs):
        # The archived sweep starts once a members' page answered, alongside the others (page 0
        # among them): it waits for that member's archive, so its window holds the new version.
        if status == "archived":
            archived_one.wait(30)
        return original_open(self, list_id_, status, *args, **kwargs)

    monkeypatch.setattr(MailchimpClient, "_page", page_then_change)
    monkeypatch.setattr(MailchimpClient, "_open", open_after_the_archive)
    result = sync(instance, f"client-1:{list_id}", overrides={"mailchimp": MailchimpResource(page_size=250)})
    pages, staged = metadata(result, "mailchimp/member_pages"), metadata(result, "mailchimp/members")
    assert done[0] > 20 and pages["total_items"] > pages["total_items_at_end"]
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.description
    assert staged["changed_duplicates"] >= 1  # the member archived after it was read
    changed_warnings = [w for w in _warnings(instance, result.run_id) if "changed while the list was paged" in w]
    assert len(changed_warnings) == 1


# The check's arithmetic on its own, for lists that change while they are paged.
PAGES = {
    "total_items": 5000,
    "total_items_at_end": 5000,
    "archived_total_items": 1500,
    "archived_total_items_at_end": 1500,
    "passes": 1,
    "archived_passes": 1,
    "members": 5000,
    "archived_members": 1500,
    "rows_fetched": 6500 + 100,
    "overlap_rows": 100,
}
MEMBERS = {"dagster/row_count": 6490, "dead_letters": 10, "rows_read": 6600, "overlap_duplicates": 100}
CONTACTS = {"records": 6480, "dead_letters": 20, "rejected": 0, "accepted": 6480}


def test_the_static_counts_reconcile_exactly() -> None:
    from mc_pipeline.assets.checks import reconcile

    assert reconcile(PAGES, MEMBERS, CONTACTS) == {}
    # One row fewer anywhere is a discrepancy:
    assert set(reconcile(PAGES, {**MEMBERS, "dagster/row_count": 6489, "rows_read": 6599}, CONTACTS)) == {
        "staging",
        "members",
        "transform",
    }
    assert set(reconcile({**PAGES, "members": 4999}, MEMBERS, CONTACTS)) == {"fetch members"}
    assert set(reconcile(PAGES, MEMBERS, {**CONTACTS, "accepted": 6479})) == {"import"}
    # Records Ometria already holds unchanged are skipped, not pushed: they count, and only exactly.
    assert reconcile(PAGES, MEMBERS, {**CONTACTS, "accepted": 80, "unchanged_skipped": 6400}) == {}
    assert set(reconcile(PAGES, MEMBERS, {**CONTACTS, "accepted": 80, "unchanged_skipped": 6399})) == {"import"}
    # On a static list the overlap positions hold the same members: fewer duplicates means fewer members read.
    assert set(reconcile(PAGES, {**MEMBERS, "overlap_duplicates": 99, "dagster/row_count": 6491}, CONTACTS)) >= {
        "members"
    }


def test_a_list_that_changes_while_it_is_paged_is_no_alarm() -> None:
    """Members left the window (it shrank by 30) and 3 were read twice in two versions: counts still hold."""
    from mc_pipeline.assets.checks import reconcile

    pages = {**PAGES, "total_items_at_end": 4970, "members": 4990, "rows_fetched": 6590}
    members = {
        "dagster/row_count": 6477,
        "dead_letters": 10,
        "rows_read": 6590,
        "overlap_duplicates": 100,
        "changed_duplicates": 3,
    }
    contacts = {"records": 6467, "dead_letters": 20, "rejected": 0, "accepted": 6467}
    assert reconcile(pages, members, contacts) == {}
    # ...but fewer staged members than stayed in the window is a loss even then.
    assert set(reconcile(pages, {**members, "dagster/row_count": 4000, "rows_read": 4113}, contacts)) >= {"members"}
