"""A full sync at the connection bound (issue 11, item 7): its pages start with no request before them,
the bound taken from our clock and proven by the pages' own Date headers, else paged again."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from mc_pipeline.local import LocalEnvironment
from mc_pipeline.resources.mailchimp import MailchimpResource
from mc_pipeline.resources.paging import CLOCK_MARGIN_S, SKEW_MARGIN_S, bound_before
from mc_pipeline.sandbox import Latency
from mc_pipeline_tests.helpers import window_pages
from mc_pipeline_tests.resources.test_mailchimp import Pages, client_of

SMALL = MailchimpResource(page_size=100, backoff_base_s=0.01)  # 2,480 members: 32 pages, more than one wave


def listed(env: LocalEnvironment, list_id: str) -> set[str]:
    return {m["id"] for m in env.sandbox.mailchimp_list(list_id).members(include_archived=False)}


def full_sync(env: LocalEnvironment, list_id: str, resource: MailchimpResource = SMALL, **kw):
    pages = Pages()
    with client_of(env, resource) as mc:
        fetched = mc.fetch(list_id, pages, since=None, sweep_archived=False, **kw).members
    return fetched, pages


def started_before_the_first_answer(log) -> int:
    return sum(r.started < min(x.ended for x in log) for r in log)


@pytest.mark.parametrize("hint", [True, False])
def test_a_full_sync_makes_no_request_before_its_pages(small_env: LocalEnvironment, hint: bool) -> None:
    """The size known (the list's history) or not (one page per connection): the first requests are pages,
    up to ten at once from the start, all with the one bound; no count before them, no page past the end."""
    sb = small_env.sandbox
    sb.state.config.mailchimp.latency = Latency(base_ms=400)  # 10 in flight even on a loaded machine (150 ms: once 9)
    list_id = sb.client("client-1").list_ids[1]
    expected = listed(small_env, list_id)
    fetched, pages = full_sync(small_env, list_id, **({"size_hint": len(expected)} if hint else {}))
    assert set(pages.ids()) == expected and fetched.passes == 1
    everything = sb.request_log("mailchimp:client-1")
    log = window_pages(everything)
    assert {r.query["count"] for r in log} == {"100"}  # pages only
    assert len({r.query["before_last_changed"] for r in log}) == 1
    # Then, once every page answered, the ids-only listing of the members changed after the bound (none).
    after = [r for r in everything if r not in log]
    assert len(after) == 1 and after[0].started >= max(r.ended for r in log)
    # Pages out before any answer (none waited for another: 10 unless the machine is very busy), 10 at most.
    assert started_before_the_first_answer(log) > 1 and sb.stats("mailchimp:client-1")["peak_in_flight"] == 10
    assert len(log) == fetched.stats.pages == 1 + len(range(80, len(expected), 80))


def test_a_wrong_hint_costs_no_member(small_env: LocalEnvironment) -> None:
    """A list that grew past its hint is paged to its end; one that shrank costs at most the first wave."""
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]
    expected = listed(small_env, list_id)
    grown, pages = full_sync(small_env, list_id, size_hint=150)
    assert set(pages.ids()) == expected and grown.total_first == len(expected)
    sb.reset_stats()
    shrunk, pages = full_sync(small_env, list_id, MailchimpResource(backoff_base_s=0.01), size_hint=50_000)
    assert set(pages.ids()) == expected and shrunk.stats.pages == 3
    log = sb.request_log("mailchimp:client-1")
    assert len(window_pages(log)) <= 10  # those past the end neither written nor counted
    assert len(log) - len(window_pages(log)) == 1  # then the ids-only listing after the bound


def test_mailchimps_clock_ahead_of_ours_proves_our_bound(small_env: LocalEnvironment) -> None:
    """Our bound is earlier than Mailchimp's clock allows: proven, the window ends on our clock, and what
    changed after it is left to the next window (it starts from the bound)."""
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]
    sb.clock.advance(3600)
    changed = sb.update_member(list_id, next(iter(listed(small_env, list_id))), merge_fields={"FNAME": "Later"})
    ours = datetime.now(UTC)
    fetched, pages = full_sync(small_env, list_id)
    latest = bound_before(datetime.now(UTC)) - timedelta(seconds=SKEW_MARGIN_S)
    assert fetched.passes == 1 and bound_before(ours) - timedelta(seconds=SKEW_MARGIN_S) <= fetched.before <= latest
    assert changed["id"] not in pages.ids()  # stamped an hour after the bound, on Mailchimp's clock
    assert set(pages.ids()) == listed(small_env, list_id) - {changed["id"]}
    with client_of(small_env, SMALL) as mc:
        after = Pages()
        mc.fetch(list_id, after, since=fetched.before, sweep_archived=False)
    assert after.ids() == [changed["id"]]


def test_our_clock_ahead_of_mailchimps_is_not_proven_and_the_list_is_paged_again(
    small_env: LocalEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    """Mailchimp's clock 30 s behind ours, more than the skew margin: a member added after the pages were
    read is stamped before our bound, so that bound would lose it (the next window starts after it). The
    pages' Dates do not prove it: the window is paged again up to a bound they prove, and every member
    stamped up to the bound recorded was read."""
    sb = small_env.sandbox
    sb.state.config.mailchimp.latency = Latency(base_ms=30)
    list_id = sb.client("client-1").list_ids[1]
    sb.clock.advance(-30)
    ours = bound_before(datetime.now(UTC)) - timedelta(seconds=SKEW_MARGIN_S)
    with caplog.at_level(logging.WARNING):
        fetched, pages = full_sync(small_env, list_id)
    added = sb.add_member(list_id, "after.the.pages@example.org")
    assert datetime.fromisoformat(added["last_changed"]) < ours  # inside a window that ended on our clock
    assert fetched.passes == 2 and fetched.before < datetime.fromisoformat(added["last_changed"])
    assert fetched.before <= sb.clock.now_dt() - timedelta(seconds=CLOCK_MARGIN_S)
    stayed = {
        m["id"]
        for m in sb.mailchimp_list(list_id).members(include_archived=False)
        if datetime.fromisoformat(m["last_changed"]) <= fetched.before
    }
    assert stayed == listed(small_env, list_id) - {added["id"]} and stayed <= set(pages.ids())
    log = window_pages(sb.request_log("mailchimp:client-1"))  # not the ids-only listing after the bound
    bounds = [r.query["before_last_changed"] for r in log]
    first = bounds[0]
    assert datetime.fromisoformat(first) >= ours and first != fetched.before.isoformat()
    # One bound per pass: the first pass's pages (stopped early) all before any page of the second.
    assert set(bounds) == {first, fetched.before.isoformat()} and bounds.count(first) <= 10
    assert max(r.started for r in log if r.query["before_last_changed"] == first) < min(
        r.started for r in log if r.query["before_last_changed"] != first
    )
    assert "later than Mailchimp's Date headers allow" in caplog.text


def test_a_slow_answer_proves_a_second_less_per_second_past_the_first() -> None:
    """The evaluation may precede the Date by the whole round trip: past a second, the bound keeps more."""
    date = datetime(2030, 1, 1, 0, 0, 10, 700_000, tzinfo=UTC)
    assert (
        bound_before(date)
        == bound_before(date, 0.9)
        == bound_before(date, 1.0)
        == date.replace(microsecond=0) - timedelta(seconds=CLOCK_MARGIN_S)
    )
    assert bound_before(date, 1.2) == bound_before(date) - timedelta(seconds=1)
    assert bound_before(date, 3.5) == bound_before(date) - timedelta(seconds=3)
