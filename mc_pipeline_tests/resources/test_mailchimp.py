"""The Mailchimp client against the sandbox: paging, fields, the connection limit, the error policy."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from mc_pipeline.local import LocalEnvironment
from mc_pipeline.registry import YamlClientRegistry
from mc_pipeline.resources.errors import MailchimpAuthError, MailchimpNotFound, MailchimpUnavailable
from mc_pipeline.resources.mailchimp import MEMBERS_FIELDS_PARAM, MailchimpResource, datacenter_url
from mc_pipeline.sandbox import Latency
from mc_pipeline.storage import RunFolder
from mc_pipeline_tests.helpers import failed_at_once, window_pages

FAST = MailchimpResource(backoff_base_s=0.01, backoff_cap_s=0.05)


def client_of(env: LocalEnvironment, resource: MailchimpResource = FAST):
    return resource.client(YamlClientRegistry(env.registry).client("client-1"))


@dataclass(frozen=True)
class Written:
    kind: str
    pass_no: int
    offset: int
    raw: bytes


class Pages:
    """A `PageWriter` that keeps what it is given; `after_first` runs once the first page is in."""

    def __init__(self, after_first: Callable[[], None] | None = None) -> None:
        self.written: list[Written] = []
        self.after_first = after_first
        self.lock = threading.Lock()

    def write_page(self, kind: str, pass_no: int, offset: int, raw: bytes) -> None:
        with self.lock:
            first = not self.written
            self.written.append(Written(kind, pass_no, offset, raw))
        if first and self.after_first is not None:
            self.after_first()

    def ids(self, kind: str = "members") -> list[str]:
        return [m["id"] for p in self.written if p.kind == kind for m in orjson.loads(p.raw)["members"]]


def collect(env: LocalEnvironment, list_id: str, resource: MailchimpResource = FAST, **window):
    """The members' sweep of a window alone."""
    pages = Pages()
    with client_of(env, resource) as mc:
        fetched = mc.fetch(
            list_id, pages, since=window.get("since"), before=window.get("before"), sweep_archived=False
        ).members
    return fetched.stats, fetched.total_first, pages.written, pages.ids()


def test_datacenter_comes_from_the_key() -> None:
    assert datacenter_url("0123456789abcdef0123456789abcdef-us6") == "https://us6.api.mailchimp.com/3.0"
    with pytest.raises(ValueError, match="not of the form"):
        datacenter_url("nodatacenter")


def test_pages_cover_the_list_with_the_configured_overlap_and_only_the_needed_fields(
    small_env: LocalEnvironment,
) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]  # 2,600 members, some archived
    expected = {m["id"] for m in sb.mailchimp_list(list_id).members(include_archived=False)}
    stats, total, pages, ids = collect(small_env, list_id)
    assert total == len(expected) and set(ids) == expected
    assert sorted(p.offset for p in pages) == [0, 980, 1960]  # each page shares 20 members with the next
    assert len(ids) == len(expected) + 2 * 20
    # The size unknown, up to one page per connection at once (those sent before the first total_items is
    # known): the ones past the end are neither written nor counted. Then one ids-only listing after the bound.
    assert 3 <= stats.calls - 1 <= 10 and stats.pages == 3 and stats.retries == 0
    _, _, pages, ids = collect(small_env, list_id, MailchimpResource(page_overlap=0))
    assert sorted(p.offset for p in pages) == [0, 1000, 2000] and sorted(ids) == sorted(expected)
    log = sb.request_log("mailchimp:client-1")
    pages_sent = window_pages(log)
    assert {r.query["fields"] for r in pages_sent} == {MEMBERS_FIELDS_PARAM}
    assert {r.query["count"] for r in pages_sent} == {"1000"} and len(pages_sent) <= 2 * 10
    assert len(log) - len(pages_sent) == 2  # each full sync's ids-only listing after its bound
    first = orjson.loads(pages[0].raw)["members"][0]
    assert "_links" not in first and "stats" not in first and set(first["location"]) == {"country_code"}


def test_the_window_is_sent_and_respected(small_env: LocalEnvironment) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[0]
    members = sb.mailchimp_list(list_id).members(include_archived=False)
    cut = sorted(m["last_changed"] for m in members)[len(members) // 2]
    since = datetime.fromisoformat(cut)
    _, total, _, ids = collect(small_env, list_id, since=since, before=datetime.now(UTC))
    assert set(ids) == {m["id"] for m in members if m["last_changed"] > cut}
    assert total == len(ids)
    query = sb.request_log("mailchimp:client-1")[-1].query
    assert query["since_last_changed"] == since.isoformat()
    assert query["sort_field"] == "last_changed"


def test_two_lists_of_one_account_never_exceed_ten_in_flight(small_env: LocalEnvironment) -> None:
    """Each fetch uses 10 threads; the process-wide account gate keeps the sum at 10."""
    sb = small_env.sandbox
    # Long enough that 10 requests are in flight at once even when a loaded machine (40 client threads
    # and the in-process sandbox on 2 cores) is slow to send them: at 60 ms the peak was once 8.
    sb.state.config.mailchimp.latency = Latency(base_ms=250)
    list_a, list_b = sb.client("client-1").list_ids
    resource = MailchimpResource(page_size=100, backoff_base_s=0.01)  # many pages, all concurrent
    results: dict[str, set[str]] = {}

    def fetch(list_id: str) -> None:
        results[list_id] = set(collect(small_env, list_id, resource)[3])

    threads = [threading.Thread(target=fetch, args=(lid,)) for lid in (list_a, list_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = sb.stats("mailchimp:client-1")
    assert stats["throttled"] == 0, "the sandbox answered 429: more than 10 requests were in flight"
    assert stats["peak_in_flight"] == 10  # and the limit was used, not merely respected
    for lid in (list_a, list_b):
        assert results[lid] == {m["id"] for m in sb.mailchimp_list(lid).members(include_archived=False)}


def test_throttling_and_transient_faults_are_retried(small_env: LocalEnvironment) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]
    sb.script_faults(list_id, ["429", "500", "drop", "truncate", "503", "403_throttle", "504"])
    stats, total, _, ids = collect(small_env, list_id)
    assert total == len(set(ids)) == len(sb.mailchimp_list(list_id).members(include_archived=False))
    assert stats.retries == 7 and stats.throttled == 2
    # At most one page per connection past the end (the size unknown), then the ids-only listing after the bound.
    assert stats.calls - stats.retries <= 10 + 1
    assert sb.stats("mailchimp:client-1")["peak_in_flight"] <= 10


def test_retries_are_bounded(small_env: LocalEnvironment) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[0]
    sb.script_faults(list_id, ["500"] * 20)
    resource = MailchimpResource(max_attempts=3, backoff_base_s=0.01)
    since = datetime(2000, 1, 1, tzinfo=UTC)  # an incremental window: its first page alone is its first request
    with pytest.raises(MailchimpUnavailable, match=f"client 'client-1', list {list_id}: gave up after 3 attempts"):
        collect(small_env, list_id, resource, since=since)
    assert sb.stats("mailchimp:client-1")["requests"] == 3


def test_a_bad_key_fails_at_once_and_names_client_and_list(
    small_env: LocalEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[0]
    monkeypatch.setenv("MC_SANDBOX_CLIENT_1_MAILCHIMP_KEY", "0" * 32 + "-us6")
    with pytest.raises(MailchimpAuthError) as err:
        collect(small_env, list_id)
    assert str(err.value).startswith(f"Mailchimp client 'client-1', list {list_id}: 401 API Key Invalid")
    assert "0" * 32 not in str(err.value)
    assert failed_at_once(small_env, "mailchimp:<unknown>")


def test_a_revoked_account_fails_at_once(small_env: LocalEnvironment) -> None:
    sb = small_env.sandbox
    sb.revoke("client-1", "mailchimp")
    with pytest.raises(MailchimpAuthError, match="403 User Disabled"):
        collect(small_env, sb.client("client-1").list_ids[0])
    assert failed_at_once(small_env)


def test_an_unknown_list_fails_at_once(small_env: LocalEnvironment) -> None:
    with pytest.raises(MailchimpNotFound, match="client 'client-1', list 00000000ff: 404 Resource Not Found"):
        collect(small_env, "00000000ff")
    assert failed_at_once(small_env)


def test_all_lists_of_an_account(small_env: LocalEnvironment) -> None:
    with client_of(small_env) as mc:
        lists = mc.lists()
    assert [x["id"] for x in lists] == list(small_env.sandbox.client("client-1").list_ids)


def _fetch_with_changes_after_first_page(env: LocalEnvironment, list_id: str, leave: int, overlap: int):
    """Page a window while `leave` members at the front leave it, just after the first page is read."""
    sb = env.sandbox
    front = sb.mailchimp_list(list_id).members(include_archived=False)
    front.sort(key=lambda m: m["last_changed"])

    def leave_the_window() -> None:  # the other pages are evaluated after these changes: offsets shift under them
        for m in front[100 : 100 + leave]:
            sb.update_member(list_id, m["id"], merge_fields={"FNAME": "moved on"})

    pages = Pages(after_first=leave_the_window)
    resource = MailchimpResource(page_size=200, page_overlap=overlap, backoff_base_s=0.01)
    with client_of(env, resource) as mc:
        fetched = mc.fetch(list_id, pages, since=None, sweep_archived=False).members
    got = set(pages.ids())
    stayed = {
        m["id"]
        for m in sb.mailchimp_list(list_id).members(include_archived=False)
        if datetime.fromisoformat(m["last_changed"]) <= fetched.before
    }
    return fetched, got, stayed


def test_changes_during_paging_skip_no_member_within_the_overlap(small_env: LocalEnvironment) -> None:
    list_id = small_env.sandbox.client("client-1").list_ids[1]
    fetched, got, stayed = _fetch_with_changes_after_first_page(small_env, list_id, leave=5, overlap=20)
    assert fetched.passes == 1 and fetched.shrank_by == 5
    assert stayed <= got  # every member still in the window was fetched


def test_a_window_that_shrinks_more_than_the_overlap_is_paged_again(small_env: LocalEnvironment) -> None:
    list_id = small_env.sandbox.client("client-1").list_ids[1]
    fetched, got, stayed = _fetch_with_changes_after_first_page(small_env, list_id, leave=30, overlap=0)
    assert fetched.passes == 2 and fetched.overlap >= 60
    assert stayed <= got


def test_without_the_overlap_plain_offset_paging_would_skip_members(small_env: LocalEnvironment) -> None:
    """The control: the same changes against one pass of plain paging lose members."""
    list_id = small_env.sandbox.client("client-1").list_ids[1]
    resource = MailchimpResource(page_size=200, page_overlap=0, max_passes=1, backoff_base_s=0.01)
    sb = small_env.sandbox
    front = sorted(sb.mailchimp_list(list_id).members(include_archived=False), key=lambda m: m["last_changed"])

    def leave_the_window() -> None:
        for m in front[100:105]:
            sb.update_member(list_id, m["id"], merge_fields={"FNAME": "moved on"})

    with client_of(small_env, resource) as mc, pytest.raises(MailchimpUnavailable, match="may have been skipped"):
        mc.fetch(list_id, Pages(after_first=leave_the_window), since=None, sweep_archived=False)


def test_a_page_that_stays_malformed_is_reported_clearly(small_env: LocalEnvironment) -> None:
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[0]
    sb.script_faults(list_id, ["truncate"] * 10)
    resource = MailchimpResource(max_attempts=3, backoff_base_s=0.01)
    since = datetime(2000, 1, 1, tzinfo=UTC)  # one page alone first: the faults all land on it
    with pytest.raises(MailchimpUnavailable, match=r"list .*: gave up after 3 attempts; last cause: malformed JSON"):
        collect(small_env, list_id, resource, since=since)


def test_a_fetch_counts_rows_overlap_and_distinct_members_apart(small_env: LocalEnvironment) -> None:
    """Rows received are not members: the overlap is counted as overlap; on a static list members = total_items."""
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]
    listed = {m["id"] for m in sb.mailchimp_list(list_id).members(include_archived=False)}
    resource = MailchimpResource(page_size=100, backoff_base_s=0.01)
    with client_of(small_env, resource) as mc:
        fetched = mc.fetch(list_id, Pages(), since=None, sweep_archived=False).members
    pages = 1 + len(range(80, len(listed), 80))
    assert fetched.stats.pages == pages and fetched.passes == 1
    assert fetched.members == fetched.total_first == len(listed)
    assert fetched.overlap_rows == 20 * (pages - 1) and fetched.rows == fetched.members + fetched.overlap_rows


def _short_page(monkeypatch: pytest.MonkeyPatch, offset: int, cut: int, times: int) -> None:
    """Mailchimp answers the page at `offset` with its last `cut` members missing, `times` times."""
    from mc_pipeline.resources.mailchimp import MailchimpClient, Response

    original = MailchimpClient._get_once
    left = [times]

    def get_once(self, path, params, *, list_id, stats):
        resp = original(self, path, params, list_id=list_id, stats=stats)
        if params.get("offset") == offset and left[0] > 0:
            left[0] -= 1
            data = {**resp.data, "members": resp.data["members"][:-cut]}
            return Response(orjson.dumps(data), data, resp.server_time)
        return resp

    monkeypatch.setattr(MailchimpClient, "_get_once", get_once)


def test_a_page_that_comes_back_short_is_paged_again(small_env: LocalEnvironment, monkeypatch) -> None:
    """A page with fewer members than its total promises leaves a gap: the window is paged again, none lost."""
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]  # pages at 0, 980 and 1960
    expected = {m["id"] for m in sb.mailchimp_list(list_id).members(include_archived=False)}
    _short_page(monkeypatch, 980, 300, times=1)  # positions 1680..1959 on no page
    stats, _, _, ids = collect(small_env, list_id)
    assert set(ids) == expected
    assert stats.pages == 6  # the second pass


def test_a_page_that_stays_short_fails_naming_the_positions(small_env: LocalEnvironment, monkeypatch) -> None:
    list_id = small_env.sandbox.client("client-1").list_ids[1]
    _short_page(monkeypatch, 980, 300, times=10)
    with pytest.raises(MailchimpUnavailable, match=r"no member at window positions 1680\.\.1959, in each of 3 passes"):
        collect(small_env, list_id)


def test_a_fetch_writes_both_sweeps_into_the_run_folder(small_env: LocalEnvironment, tmp_path) -> None:
    """One call: the members' sweep, then (once its first page answered) the archived one, each page
    gzipped into the run folder under its kind; the result sums both."""
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[1]
    listed = {m["id"] for m in sb.mailchimp_list(list_id).members(include_archived=False)}
    archived = {m["id"] for m in sb.mailchimp_list(list_id).members(include_archived=True)} - listed
    folder = RunFolder(tmp_path / "run")
    with client_of(small_env) as mc:
        fetched = mc.fetch(list_id, folder, since=None)
    files = sorted(p.name for p in folder.pages.iterdir())
    assert [f for f in files if f.startswith("archived")] == ["archived-p0-000000000.json.gz"]
    assert [f for f in files if f.startswith("members")] == [f"members-p0-{o:09d}.json.gz" for o in (0, 980, 1960)]

    def ids(kind: str) -> set[str]:
        pages = folder.pages.glob(f"{kind}-*.json.gz")
        return {m["id"] for p in pages for m in orjson.loads(gzip.decompress(p.read_bytes()))["members"]}

    assert ids("members") == listed and ids("archived") == archived and archived
    assert fetched.archived is not None and fetched.archived.members == len(archived)
    assert fetched.members.members == len(listed) and fetched.total("pages") == 4
    # The members' first wave (some past the end), the archived page, each sweep's ids-only listing after its bound.
    assert fetched.total("calls") <= 10 + 1 + 2
    log = sb.request_log("mailchimp:client-1")
    pages = window_pages(log)
    assert "status" not in log[0].query and {r.query["count"] for r in pages} == {"1000"}  # pages only, no count
    assert [r.query.get("status") for r in pages].count("archived") == 1 and len(log) - len(pages) == 2


def test_a_bad_probe_starts_no_archived_sweep(small_env: LocalEnvironment, tmp_path) -> None:
    with client_of(small_env) as mc, pytest.raises(MailchimpNotFound):
        mc.fetch("00000000ff", RunFolder(tmp_path / "run"), since=None)
    assert failed_at_once(small_env)
    assert all("status" not in r.query for r in small_env.sandbox.request_log("mailchimp:client-1"))


def test_the_window_ends_the_clock_margin_before_the_first_answer(small_env: LocalEnvironment) -> None:
    """Whole-second Date headers: a change after the first request's evaluation may be stamped the Date's
    second minus one, so an incremental window's bound is CLOCK_MARGIN_S (2 s) before its first answer, as
    the schedule's probes use (a full sync's is on our clock: test_mailchimp_bound.py)."""
    from mc_pipeline.resources.paging import CLOCK_MARGIN_S

    sb = small_env.sandbox
    when = datetime(2033, 4, 5, 6, 7, 8, tzinfo=UTC)
    sb.clock.set(when.timestamp() + 0.2)  # the answer comes well within the second `when`
    list_id = sb.client("client-1").list_ids[0]
    with client_of(small_env) as mc:
        fetched = mc.fetch(list_id, Pages(), since=datetime(2000, 1, 1, tzinfo=UTC), sweep_archived=False).members
    assert CLOCK_MARGIN_S == 2 and fetched.before == when - timedelta(seconds=2)
