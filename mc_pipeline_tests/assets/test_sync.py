"""The assets end to end through Dagster (`materialize`) against the sandbox: full, incremental, idempotent."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance

from mc_pipeline.assets.watermarks import latest_watermark
from mc_pipeline.local import LocalEnvironment
from mc_pipeline.resources.paging import OUR_CLOCK
from mc_pipeline_tests.helpers import (
    assert_ometria_matches,
    expected_contacts,
    metadata,
    settle,
    sync,
    window_pages,
)


def test_full_then_incremental_then_unchanged(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    sb = small_env.sandbox
    client = sb.client("client-1")
    list_id = client.list_ids[1]
    partition = f"client-1:{list_id}"

    full = sync(instance, partition)
    assert full.success
    expected = expected_contacts(sb, list_id)  # archived members included: they land opted out
    listed = sb.mailchimp_list(list_id).members(include_archived=False)
    pages = metadata(full, "mailchimp/member_pages")
    assert pages["full_refresh"] is True and pages["total_items"] == len(listed)
    assert pages["archived_members"] == len(expected) - len(listed) > 0
    assert pages["pages"] == 3 + 1 and pages["passes"] == 1  # three pages of members, one of archived ones
    staged = metadata(full, "mailchimp/members")
    assert staged["dagster/row_count"] == len(expected)
    assert "***@" in staged["preview"] and "dagster/column_schema" in staged
    contacts = metadata(full, "ometria/contacts")
    assert contacts["records"] == contacts["pushed"] == contacts["accepted"] == len(expected)
    assert contacts["rejected"] == 0 and contacts["requests"] == -(-len(expected) // 100)
    assert_ometria_matches(sb, partition)
    watermark = latest_watermark(instance, partition)
    assert watermark is not None
    (check,) = full.get_asset_check_evaluations()
    assert check.check_name == "counts_reconcile" and check.passed
    counts = {k: v.value for k, v in check.metadata.items()}
    assert counts["staged"] == counts["contacts"] == counts["accepted"] == len(expected)

    # Change the list: one new member, one unsubscribed, one renamed, one archived.
    members = sb.mailchimp_list(list_id).members(include_archived=False)
    sb.add_member(list_id, "New.Person+test@Example.com")
    sb.set_status(list_id, members[0]["id"], "unsubscribed")
    sb.update_member(list_id, members[1]["id"], merge_fields={"FNAME": "Renamed"})
    sb.set_status(list_id, members[2]["id"], "archived")
    settle(sb)
    sb.reset_stats()

    incremental = sync(instance, partition)
    pages = metadata(incremental, "mailchimp/member_pages")
    assert pages["full_refresh"] is False
    assert pages["window_since"] == watermark.timestamp()
    assert pages["members"] == 3 and pages["archived_members"] == 1  # archived members come by their own sweep
    assert sb.stats("mailchimp:client-1")["requests"] == 2  # one page of changes, one of archivals
    assert sb.stats("ometria:client-1")["requests"] == 1
    held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
    assert held[members[0]["contact_id"]]["marketing_optin"] == "EXPLICITLY_OPTEDOUT"
    assert held[members[2]["contact_id"]]["marketing_optin"] == "EXPLICITLY_OPTEDOUT"  # archived
    assert held[members[1]["contact_id"]]["firstname"] == "Renamed"
    new = sb.mailchimp_list(list_id).get("new.person+test@example.com")
    assert held[new["contact_id"]]["email"] == "New.Person+test@Example.com"
    assert latest_watermark(instance, partition) > watermark

    settle(sb)
    sb.reset_stats()
    unchanged = sync(instance, partition)
    assert metadata(unchanged, "ometria/contacts")["records"] == 0
    assert sb.stats("mailchimp:client-1")["requests"] == 2  # the members probe and the archived probe
    assert sb.stats("ometria:client-1")["requests"] == 0


def test_running_a_partition_twice_stores_each_contact_once(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[0]
    partition = f"client-1:{list_id}"
    sync(instance, partition)
    sync(instance, partition, full_refresh=True, push_all=True)  # unchanged records are sent again only so
    n = len(expected_contacts(sb, list_id))
    assert sb.ometria_writes("client-1") == 2 * n  # every record sent twice...
    assert len(sb.ometria_contacts("client-1")) == n  # ...and held once
    assert_ometria_matches(sb, partition)


def test_two_lists_land_in_their_own_collections(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    sb = small_env.sandbox
    for list_id in sb.client("client-1").list_ids:
        sync(instance, f"client-1:{list_id}")
    for list_id in sb.client("client-1").list_ids:
        assert_ometria_matches(sb, f"client-1:{list_id}")


def test_a_failed_import_keeps_the_watermark(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[0]
    partition = f"client-1:{list_id}"
    sync(instance, partition)
    watermark = latest_watermark(instance, partition)
    sb.add_member(list_id, "another@example.org")
    settle(sb)
    sb.revoke("client-1", "ometria")
    result = sync(instance, partition, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message  # type: ignore[union-attr]
    assert f"Ometria client 'client-1', list {list_id}: 403" in message
    assert latest_watermark(instance, partition) == watermark
    sb.revoke("client-1", "ometria", revoked=False)
    assert sync(instance, partition).success
    assert_ometria_matches(sb, partition)


def test_a_partition_not_in_the_registry_is_refused(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    result = sync(instance, "client-1:0123456789", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert (
        "list 0123456789 is not among the lists of client 'client-1' in the registry"
        in failure.event_specific_data.error.message
    )


@pytest.mark.parametrize("keep", [1, 2])
def test_old_run_folders_are_pruned(
    small_env: LocalEnvironment, instance: DagsterInstance, keep: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mc_pipeline import definitions
    from mc_pipeline.storage import PipelineStorage

    original = definitions.resources

    def with_retention() -> dict:
        return {**original(), "storage": PipelineStorage(keep_runs=keep)}

    monkeypatch.setattr("mc_pipeline_tests.helpers.resources", with_retention)
    list_id = small_env.sandbox.client("client-1").list_ids[0]
    partition = f"client-1:{list_id}"
    for _ in range(3):
        sync(instance, partition)
    runs = Path(small_env.data_dir, "lists", "client-1", list_id, "runs")
    assert len([p for p in runs.iterdir() if p.is_dir()]) == keep


def test_the_reconciliation_check_names_the_counts_when_a_step_loses_a_record(
    small_env: LocalEnvironment, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staging bug that drops one member: the run succeeds, the check fails and says where."""
    from mc_pipeline import staging

    original = staging.parse_page

    def lossy(raw: bytes, page_offset: int = 0):
        table, dead = original(raw, page_offset)
        return (table.slice(1) if page_offset == 0 and table.num_rows else table), dead

    monkeypatch.setattr(staging, "parse_page", lossy)
    list_id = small_env.sandbox.client("client-1").list_ids[0]
    result = sync(instance, f"client-1:{list_id}")
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert "were staged or dead-lettered" in check.description
    counts = {k: v.value for k, v in check.metadata.items()}
    assert counts["staged"] == counts["mailchimp_total_first"] + counts["archived"] - 2  # page 0 of both sweeps


def test_members_deleted_outright_are_opted_out_by_a_full_refresh(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[0]
    partition = f"client-1:{list_id}"
    sync(instance, partition)
    doomed = sb.mailchimp_list(list_id).members(include_archived=False)[:3]
    for m in doomed:
        sb.delete_member(list_id, m["id"])
    settle(sb)
    incremental = sync(instance, partition)  # a window cannot see a deletion...
    assert metadata(incremental, "ometria/contacts")["deleted_in_mailchimp_opted_out"] == 0
    held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
    assert all(
        held[m["contact_id"]]["marketing_optin"] != "EXPLICITLY_OPTEDOUT" for m in doomed if m["status"] == "subscribed"
    )
    full = sync(instance, partition, full_refresh=True)  # ...the weekly full refresh can
    assert metadata(full, "ometria/contacts")["deleted_in_mailchimp_opted_out"] == 3
    held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
    for m in doomed:
        record = held[m["contact_id"]]
        assert record["marketing_optin"] == "EXPLICITLY_OPTEDOUT" and record["properties"]["mailchimp_deleted"]
        assert record["email"] == m["email_address"]  # @merge kept the rest of the record
    assert_ometria_matches(sb, partition)
    again = sync(instance, partition, full_refresh=True)  # and only once
    assert metadata(again, "ometria/contacts")["deleted_in_mailchimp_opted_out"] == 0


def test_a_full_refresh_is_sized_by_the_lists_history(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    """The list's size at its last full sync (carried by the incremental ones) gives the next full sync its
    page count: its first requests are its pages, exactly as many as the list needs, with no count before."""
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]
    partition = f"client-1:{list_id}"
    n = len(sb.mailchimp_list(list_id).members(include_archived=False))
    assert metadata(sync(instance, partition), "mailchimp/member_pages")["list_members"] == n
    sb.add_member(list_id, "one.more@example.org")
    settle(sb)
    assert metadata(sync(instance, partition), "mailchimp/member_pages")["list_members"] == n  # carried over
    sb.reset_stats()
    full = metadata(sync(instance, partition, full_refresh=True), "mailchimp/member_pages")
    log = [r for r in sb.request_log("mailchimp:client-1") if r.path.endswith("/members")]
    pages = window_pages(log)
    assert {r.query["count"] for r in pages} == {"1000"}  # pages only: no count before them
    assert len([r for r in pages if "status" not in r.query]) == full["pages"] - 1 == 3  # and the archived page
    assert len(log) - len(pages) == 2  # and each sweep's ids-only listing of the members changed after its bound
    assert full["list_members"] == full["members"] == n + 1


LATER_S = 60


def test_a_member_changed_after_the_full_refreshs_bound_is_not_judged_deleted(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """A full refresh lists up to its bound B; a member (or an archived one) that changed after B (while the
    list was paged, or in the margin) is not on its pages, yet exists: it must not be opted out as deleted."""
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[0]
    partition = f"client-1:{list_id}"
    sync(instance, partition)
    settle(sb)
    everyone = sb.mailchimp_list(list_id).members()
    live = [m for m in everyone if m["status"] == "subscribed"]
    archived = next(m for m in everyone if m["status"] == "archived")
    doomed, changed = live[0], live[1]
    sb.delete_member(list_id, doomed["id"])
    # Changes Mailchimp commits while the full refresh pages the list: stamped after both its sweeps' bounds.
    sb.clock.advance(LATER_S)
    sb.update_member(list_id, changed["id"], merge_fields={"FNAME": "Later"})
    sb.update_member(list_id, archived["id"], merge_fields={"FNAME": "Later"})
    sb.clock.advance(-LATER_S)
    full = sync(instance, partition, full_refresh=True)
    assert metadata(full, "ometria/contacts")["deleted_in_mailchimp_opted_out"] == 1  # the deleted one only
    assert metadata(full, "mailchimp/member_pages")["listed_after_bound"] == 2
    held = sb.ometria_contacts("client-1", f"mailchimp-{list_id}")
    assert held[doomed["contact_id"]]["marketing_optin"] == "EXPLICITLY_OPTEDOUT"
    assert held[changed["contact_id"]]["marketing_optin"] != "EXPLICITLY_OPTEDOUT"
    assert not held[changed["contact_id"]]["properties"].get("mailchimp_deleted")
    assert not held[archived["contact_id"]]["properties"].get("mailchimp_deleted")
    sb.clock.advance(LATER_S)
    OUR_CLOCK.offset_s += LATER_S
    settle(sb)
    later = metadata(sync(instance, partition), "mailchimp/member_pages")  # the next window carries their change
    assert later["members"] == later["archived_members"] == 1
