"""Mailchimp API v3: a pooled session per account, a window fetched into a `PageWriter` (`fetch`).

Error policy (the table our importer inherited, applied per request by `HttpRetryPolicy`, retry.py):
- 429, or a bare (non-JSON) 403 from Mailchimp's edge: throttled; wait `Retry-After` if given,
  else exponential backoff with jitter; retried up to `max_throttle_waits`.
- 5xx, timeouts, dropped connections, cut or malformed JSON, a page without members: exponential
  backoff with jitter, at most `max_attempts` attempts per page, all causes together.
- 401, 403 (problem+json), 404, other 4xx: fail at once, naming client and list; no retry.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import orjson
from pydantic import Field, SecretStr

from mc_pipeline.registry import MAILCHIMP_KEY_RE, Client
from mc_pipeline.resources.errors import (
    MailchimpAuthError,
    MailchimpNotFound,
    MailchimpRequestError,
    MailchimpUnavailable,
)
from mc_pipeline.resources.http import TRANSIENT, HttpSettings, RequestRefused, json_object, pooled_session, server_time
from mc_pipeline.resources.limits import account_gate, fingerprint
from mc_pipeline.resources.paging import (
    MEMBERS_FIELDS_PARAM,
    FetchResult,
    FetchStats,
    OpenSweep,
    Page,
    PageWriter,
    SweepResult,
    bound_before,
    covered,
    gaps_below,
    next_offsets,
    window_params,
)
from mc_pipeline.resources.retry import HttpRetryPolicy, Retryable, retry_after

log = logging.getLogger(__name__)
T = TypeVar("T")


def datacenter_url(api_key: str) -> str:
    """`...-us6` -> `https://us6.api.mailchimp.com/3.0`."""
    match = MAILCHIMP_KEY_RE.fullmatch(api_key)
    if not match:
        raise ValueError("the Mailchimp key is not of the form <32 hex>-<datacenter>")
    return f"https://{match.group(1)}.api.mailchimp.com/3.0"


@dataclass(frozen=True)
class Response:
    body: bytes
    data: Any
    server_time: datetime | None  # from the Date header: Mailchimp's clock, not ours


class MailchimpClient:
    """One account's client. Thread-safe; its requests in flight never exceed the account's limit."""

    def __init__(
        self,
        *,
        client_id: str,
        api_key: SecretStr,
        base_url: str | None,
        max_connections: int,
        page_size: int,
        timeout: tuple[float, float],
        policy: HttpRetryPolicy,
        overlap: int = 20,
        max_passes: int = 3,
        logger: Any = None,
        allow_private_network: bool = False,
        deadline_s: float | None = None,
    ) -> None:
        self.client_id = client_id
        self.overlap = overlap
        self.max_passes = max_passes
        key = api_key.get_secret_value()
        self.base_url = (base_url or datacenter_url(key)).rstrip("/")
        self.max_connections = max_connections
        self.page_size = page_size
        self.timeout = timeout
        self.policy = policy
        self.log = logger or log
        self.gate = account_gate(f"mailchimp:{fingerprint(key)}", max_connections)
        private, headers = allow_private_network, {"Accept-Encoding": "gzip, deflate"}
        self.session = pooled_session(max_connections, headers, allow_private_network=private, deadline_s=deadline_s)
        self.session.auth = ("mc-pipeline", key)  # Basic: any user name, the key as password
        self._rng = random.Random()

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> MailchimpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def get(self, path: str, params: dict[str, Any], *, list_id: str | None, stats: FetchStats) -> Response:
        """GET with the error policy; returns the raw body, its parsed JSON and the server's clock."""
        return self._retried(lambda: self._get_once(path, params, list_id=list_id, stats=stats), stats, list_id)

    def _retried(self, attempt: Callable[[], T], stats: FetchStats, list_id: str | None) -> T:
        give_up = partial(MailchimpUnavailable, client_id=self.client_id, list_id=list_id)
        return self.policy.call(attempt, stats, give_up, log=self.log, rng=self._rng)

    def _get_once(self, path: str, params: dict[str, Any], *, list_id: str | None, stats: FetchStats) -> Response:
        url = f"{self.base_url}{path}"
        with self.gate:  # the account's connection limit, shared by every thread of this process
            stats.add(calls=1)
            try:
                resp = self.session.get(url, params=params, timeout=self.timeout)
                body = resp.content
            except TRANSIENT as exc:
                raise Retryable(type(exc).__name__) from None
            except RequestRefused as exc:  # its text is ours (see ApiSession): a redirect, a refused address
                raise MailchimpRequestError(str(exc), client_id=self.client_id, list_id=list_id) from None
        stats.add(bytes=len(body))
        status = resp.status_code
        if status == 200:
            try:
                return Response(body, orjson.loads(body), server_time(resp))
            except orjson.JSONDecodeError:
                raise Retryable(f"malformed JSON ({len(body)} bytes)") from None
        problem = json_object(resp)
        if status == 429:
            raise Retryable("429 Too Many Requests", retry_after(resp), throttle=True)
        if status == 403 and problem is None:
            raise Retryable("403 without a problem document (edge throttling)", retry_after(resp), throttle=True)
        if status >= 500:
            raise Retryable(f"{status} {problem.get('title', '') if problem else resp.reason}".strip())
        title = problem.get("title", resp.reason) if problem else resp.reason
        detail = problem.get("detail", "") if problem else body[:200].decode("utf-8", "replace")
        message = f"{status} {title}: {detail}".strip()
        if status in (401, 403):
            raise MailchimpAuthError(message, client_id=self.client_id, list_id=list_id, status=status)
        if status == 404:
            raise MailchimpNotFound(message, client_id=self.client_id, list_id=list_id, status=status)
        raise MailchimpRequestError(message, client_id=self.client_id, list_id=list_id, status=status)

    # ------------------------------------------------------------------ endpoints
    def lists(self) -> list[dict[str, Any]]:
        """Every audience of the account (for registry entries with `lists: all`)."""
        out: list[dict[str, Any]] = []
        stats, offset, fields = FetchStats(), 0, "lists.id,lists.name,lists.stats.member_count,total_items"
        while True:
            params = {"count": 1000, "offset": offset, "fields": fields}
            data = self.get("/lists", params, list_id=None, stats=stats).data
            batch = data.get("lists") or []
            out.extend(batch)
            offset += len(batch)
            if not batch or offset >= int(data.get("total_items", 0)):
                return out

    def list_name(self, list_id: str) -> str:
        """The audience's name, for the UI (partition keys are ids): one small request a run."""
        data = self.get(f"/lists/{list_id}", {"fields": "name"}, list_id=list_id, stats=FetchStats()).data
        return str(data.get("name") or "") if isinstance(data, dict) else ""

    def changed_since(self, list_id: str, since: datetime | None, status: str | None = None) -> tuple[int, datetime]:
        """One request, no member: how many members of the window (since, now] there are, and Mailchimp's
        clock (the Date header) when it answered. The schedule's probe (automation/probes.py)."""
        total, clock = self._count(list_id, since, None, status, FetchStats())
        if clock is None:
            raise MailchimpUnavailable(
                "the probe's answer has no Date header", client_id=self.client_id, list_id=list_id
            )
        return total, clock

    def _count(
        self, list_id: str, since: datetime | None, before: datetime | None, status: str | None, stats: FetchStats
    ) -> tuple[int, datetime | None]:
        """A window's size and Mailchimp's clock, from one request of a count and no member."""
        params = {**window_params(since, before, status, sort=False), "count": 1, "fields": "total_items"}
        resp = self.get(f"/lists/{list_id}/members", params, list_id=list_id, stats=stats)
        total = resp.data.get("total_items") if isinstance(resp.data, dict) else None
        if not isinstance(total, int):
            raise MailchimpUnavailable(
                "the count's answer has no total_items", client_id=self.client_id, list_id=list_id
            )
        return total, resp.server_time

    def fetch(
        self,
        list_id: str,
        pages: PageWriter,
        *,
        since: datetime | None,
        archived_since: datetime | None = None,
        sweep_archived: bool = True,
        before: datetime | None = None,
        before_fallback: datetime | None = None,
    ) -> FetchResult:
        """Every member whose last_changed is in (since, before], and with `sweep_archived` every
        archived one in (archived_since, before]: each page goes to `pages` as it arrives.

        The members' first request is the probe: a revoked key or a deleted list fails on that one
        request. Once it has answered, the archived sweep (usually a page or two) runs alongside
        the members' pages; both share the account's connections (one gate per account).

        When `before` is not given, each sweep's first request has no upper bound and its window
        ends `CLOCK_MARGIN_S` before Mailchimp's own clock (its Date header) at that answer: every
        change Mailchimp makes after the run began is stamped later, whatever the skew between its
        clock and ours, so it falls in the next window, never in a gap.

        A full sync's first request is a count (`count=1`, no member): it fixes the bound and gives
        the window's size, so every page, the first included, starts at once and the account's
        connections are all busy from the start. An incremental window is usually one page: its
        first page is its first request.
        """
        members = self._open(list_id, None, since, before, before_fallback, pages, count_first=since is None)
        with ThreadPoolExecutor(1, thread_name_prefix=f"mc-archived-{list_id}") as pool:
            archived = None
            if sweep_archived:
                open_archived = partial(self._open, list_id, "archived", archived_since, before, before_fallback, pages)
                archived = pool.submit(lambda: self._page_all(open_archived(), pages))
            result = self._page_all(members, pages)
            return FetchResult(result, archived.result() if archived is not None else None)

    def _open(
        self,
        list_id: str,
        status: str | None,
        since: datetime | None,
        before: datetime | None,
        before_fallback: datetime | None,
        pages: PageWriter,
        count_first: bool = False,
    ) -> OpenSweep:
        """A sweep's first request (its count, or its first page, written); the window's upper bound
        fixed from it if not given."""
        stats, started = FetchStats(), time.monotonic()
        first: Page | None = None
        if count_first:
            total, clock = self._count(list_id, since, before, status, stats)
        else:
            first = self._page(list_id, 0, window_params(since, before, status), stats)
            total, clock = first.total_items, first.server_time
        if before is None:
            before = bound_before(clock or before_fallback or datetime.now(UTC))
        opened = OpenSweep(list_id, status or "members", status, since, before, total, first, stats, started)
        if first is not None:
            pages.write_page(opened.kind, 0, first.offset, first.raw)
        return opened

    def _page_all(self, sweep: OpenSweep, pages: PageWriter) -> SweepResult:
        """The rest of a sweep's window, concurrently, after its first request.

        Why no member is skipped although offsets move under concurrent changes: with both
        bounds fixed, a change can only take a member *out* of the window (its new last_changed
        is past `before`), so the window only shrinks and a member's position only decreases,
        by at most the shrink: the largest total_items any page of a pass saw (the earliest
        evaluated) less the smallest. Pages overlap by `overlap` members; if the window shrank by
        no more than that during the pass, every member that stayed was on some page. Otherwise
        the window is paged again, with a wider overlap. A page that returns fewer members than
        its own total promises leaves positions no page read (a gap): the window is paged again
        too; the counts of the last pass are in the result. A count taken before the bound was
        fixed is at least the window's size (the window only shrinks), so its pages reach the end.
        """
        list_id, stats, first = sweep.list_id, sweep.stats, sweep.first
        overlap = min(self.overlap, self.page_size - 1)
        passes, size = 1, sweep.total  # `size`: at least the window's size now, which offsets must reach
        spans = [(0, first.members)] if first is not None else []  # (offset, rows): which positions were read
        window = sweep.params()
        while True:
            offsets = next_offsets(size, self.page_size, overlap)
            if first is None:
                offsets.insert(0, 0)
            largest, smallest, read = self._fetch_concurrently(sweep, offsets, window, passes - 1, pages)
            total_first = max(largest, first.total_items) if first is not None else largest
            total_last = min(total_first, smallest)
            spans += read
            gaps = gaps_below(spans, total_last)
            if total_first - total_last <= overlap and not gaps:
                break
            # A shrink past the overlap may have skipped members; a gap is positions no page returned.
            cause = (
                f"pages returned no member at window positions {', '.join(f'{a}..{b - 1}' for a, b in gaps[:5])}"
                if gaps
                else f"the window shrank by {total_first - total_last} members while it was paged, more than "
                f"the {overlap}-member overlap"
            )
            if passes >= self.max_passes:
                raise MailchimpUnavailable(
                    f"{cause}, in each of {passes} passes; members may have been skipped",
                    client_id=self.client_id,
                    list_id=list_id,
                )
            self.log.warning(f"Mailchimp {self.client_id} list {list_id}: {cause}; paging it again")
            passes += 1
            overlap = min(max(overlap, 2 * (total_first - total_last)), self.page_size // 2)
            first, size, spans = None, total_last, []  # every page of the next pass at once
        stats.seconds = time.monotonic() - sweep.started
        return SweepResult(
            sweep.since, sweep.before, sweep.status, total_first, total_last, passes, overlap, stats, covered(spans)
        )

    def _fetch_concurrently(
        self, sweep: OpenSweep, offsets: list[int], window: dict[str, Any], pass_no: int, pages: PageWriter
    ) -> tuple[int, int, list[tuple[int, int]]]:
        """Fetch `offsets` with at most the account's connections in flight: the largest and the
        smallest total seen, and each page's (offset, rows). Logs progress every 10 s."""
        totals: list[int] = []
        read: list[tuple[int, int]] = []
        lock = threading.Lock()

        def fetch(offset: int) -> None:
            page = self._page(sweep.list_id, offset, window, sweep.stats)
            with lock:
                totals.append(page.total_items)
                read.append((offset, page.members))
            pages.write_page(sweep.kind, pass_no, offset, page.raw)

        if not offsets:
            return 0, 1 << 62, read
        with ThreadPoolExecutor(self.max_connections, thread_name_prefix=f"mc-{sweep.list_id}") as pool:
            pending = {pool.submit(fetch, off) for off in offsets}
            while pending:
                done, pending = wait(pending, timeout=5.0, return_when=FIRST_EXCEPTION)
                for fut in done:
                    exc = fut.exception()
                    if exc is not None:
                        for other in pending:
                            other.cancel()
                        raise exc
                self._progress(sweep, len(offsets) + (sweep.first is not None))
        return max(totals), min(totals), read

    def _progress(self, sweep: OpenSweep, pass_pages: int) -> None:
        if time.monotonic() - sweep.logged < 10:
            return
        sweep.logged = time.monotonic()
        s = sweep.stats
        self.log.info(
            f"Mailchimp {self.client_id} list {sweep.list_id} {sweep.kind}: {s.pages}/{pass_pages} pages "
            f"({s.rows} rows, the pages' overlap included), {s.calls} calls, {s.retries} retries"
        )

    def _page(self, list_id: str, offset: int, window: dict[str, Any], stats: FetchStats) -> Page:
        """One page; valid JSON of the wrong shape is retried like a cut body (one policy, one budget)."""
        params = {**window, "count": self.page_size, "offset": offset, "fields": MEMBERS_FIELDS_PARAM}
        return self._retried(lambda: self._read_page(list_id, offset, params, stats), stats, list_id)

    def _read_page(self, list_id: str, offset: int, params: dict[str, Any], stats: FetchStats) -> Page:
        resp = self._get_once(f"/lists/{list_id}/members", params, list_id=list_id, stats=stats)
        data = resp.data
        members = data.get("members") if isinstance(data, dict) else None
        total = data.get("total_items") if isinstance(data, dict) else None
        if not (isinstance(members, list) and isinstance(total, int)):
            raise Retryable(f"the page at offset {offset} has no 'members' list or 'total_items'")
        stats.add(pages=1, rows=len(members))
        return Page(offset=offset, raw=resp.body, members=len(members), total_items=total, server_time=resp.server_time)


class MailchimpResource(HttpSettings):
    """HTTP settings for every Mailchimp account; credentials come per client from the registry."""

    page_size: int = Field(default=1000, ge=1, le=1000)
    read_timeout_s: float = Field(default=60.0, description="a 1000-member page can take seconds on a big list")
    max_connections: int | None = Field(default=None, ge=1, le=10, description="overrides the registry's per account")
    page_overlap: int = Field(
        default=20, ge=0, le=500, description="members each page shares with the next (see fetch)"
    )
    max_passes: int = Field(default=3, ge=1, description="pagings of a window that kept shrinking before the run fails")
    sweep_archived: bool = Field(
        default=True, description="also fetch members archived since the last sweep (opt-outs)"
    )

    def client(self, client: Client, logger: Any = None, api_key: SecretStr | None = None) -> MailchimpClient:
        return MailchimpClient(
            client_id=client.id,
            api_key=api_key or client.mailchimp.resolve_key(),
            base_url=client.mailchimp.base_url,
            allow_private_network=client.mailchimp.allow_private_network,
            deadline_s=self.deadline_s,
            max_connections=self.max_connections or client.mailchimp.max_connections,
            page_size=self.page_size,
            timeout=self.timeouts(),
            policy=self.retry_policy(),
            overlap=self.page_overlap,
            max_passes=self.max_passes,
            logger=logger,
        )
