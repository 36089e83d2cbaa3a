"""Mailchimp Marketing API v3: one pooled session per account, a window fetched into a `PageWriter`
(`MailchimpClient.fetch`), the error policy.

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
from datetime import UTC, datetime, timedelta
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
    FetchResult,
    FetchStats,
    OpenSweep,
    Page,
    PageWriter,
    SweepResult,
    covered,
    gaps_below,
    next_offsets,
    window_params,
)
from mc_pipeline.resources.retry import HttpRetryPolicy, Retryable, retry_after

log = logging.getLogger(__name__)
T = TypeVar("T")

# What the transform reads; the payload is most of a page's cost, so nothing else is asked for.
MEMBER_FIELDS: tuple[str, ...] = (
    "id",
    "email_address",
    "unique_email_id",
    "contact_id",
    "full_name",
    "status",
    "merge_fields",
    "timestamp_signup",
    "timestamp_opt",
    "last_changed",
    "language",
    "vip",
    "member_rating",
    "location.country_code",
    "source",
    "tags",
)
LISTS_FIELDS = "lists.id,lists.name,lists.stats.member_count,total_items"
MEMBERS_FIELDS_PARAM = ",".join([f"members.{f}" for f in MEMBER_FIELDS] + ["total_items"])


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

    def _get_once(self, path: str, params: dict[str, Any], *, list_id: str | None, stats: FetchStats):
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
        stats = FetchStats()
        offset = 0
        while True:
            params = {"count": 1000, "offset": offset, "fields": LISTS_FIELDS}
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
        params: dict[str, Any] = {"count": 1, "fields": "total_items"}
        if since is not None:
            params["since_last_changed"] = since.isoformat(timespec="seconds")
        if status is not None:
            params["status"] = status
        resp = self.get(f"/lists/{list_id}/members", params, list_id=list_id, stats=FetchStats())
        total = resp.data.get("total_items") if isinstance(resp.data, dict) else None
        if not isinstance(total, int) or resp.server_time is None:
            raise MailchimpUnavailable(
                "the probe's answer has no total_items or no Date header", client_id=self.client_id, list_id=list_id
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

        The members' first page is the probe: a revoked key or a deleted list fails on that one
        request. Once it has answered, the archived sweep (usually a page or two) runs alongside
        the remaining pages; both share the account's connections (one gate per account).

        When `before` is not given, each sweep asks for its first page without an upper bound and
        its window ends one second before Mailchimp's own clock (its Date header) at that request:
        every change Mailchimp makes after the run began is stamped later, whatever the skew
        between its clock and ours, so it falls in the next window, never in a gap.
        """
        members = self._open(list_id, None, since, before, before_fallback, pages)  # the probe
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
    ) -> OpenSweep:
        """A sweep's first page, written; the window's upper bound fixed from it if not given."""
        stats, started = FetchStats(), time.monotonic()
        first = self._page(list_id, 0, window_params(since, before, status), stats)
        if before is None:
            clock = first.server_time or before_fallback or datetime.now(UTC)
            before = clock.replace(microsecond=0) - timedelta(seconds=1)
        opened = OpenSweep(list_id, status or "members", status, since, before, first, stats, started)
        pages.write_page(opened.kind, 0, first.offset, first.raw)
        return opened

    def _page_all(self, sweep: OpenSweep, pages: PageWriter) -> SweepResult:
        """The rest of a sweep's window, concurrently, after its first page.

        Why no member is skipped although offsets move under concurrent changes: with both
        bounds fixed, a change can only take a member *out* of the window (its new last_changed
        is past `before`), so the window only shrinks and a member's position only decreases,
        by at most the shrink. Pages overlap by `overlap` members; if the window shrank by no
        more than that between the first and the last page evaluated, every member that stayed
        was on some page. Otherwise the window is paged again, with a wider overlap. A page that
        returns fewer members than its own total promises leaves positions no page read (a gap):
        the window is paged again too; the counts of the last pass are in the result.
        """
        list_id, stats = sweep.list_id, sweep.stats
        total_first = total_last = sweep.first.total_items
        overlap = min(self.overlap, self.page_size - 1)
        passes = 1
        spans = [(0, sweep.first.members)]  # (offset, rows) of this pass's pages: which positions were read
        window = sweep.params()
        while True:
            smallest, read = self._fetch_concurrently(
                sweep, next_offsets(total_first, self.page_size, overlap), window, passes - 1, pages
            )
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
            again = self._page(list_id, 0, window, stats)
            pages.write_page(sweep.kind, passes - 1, again.offset, again.raw)
            total_first = again.total_items
            spans = [(0, again.members)]
        stats.seconds = time.monotonic() - sweep.started
        return SweepResult(
            sweep.since, sweep.before, sweep.status, total_first, total_last, passes, overlap, stats, covered(spans)
        )

    def _fetch_concurrently(
        self, sweep: OpenSweep, offsets: list[int], window: dict[str, Any], pass_no: int, pages: PageWriter
    ) -> tuple[int, list[tuple[int, int]]]:
        """Fetch `offsets` with at most the account's connections in flight: the smallest total seen,
        and each page's (offset, rows). Logs progress every 10 s."""
        smallest = [1 << 62]
        read: list[tuple[int, int]] = []
        lock = threading.Lock()

        def fetch(offset: int) -> None:
            page = self._page(sweep.list_id, offset, window, sweep.stats)
            with lock:
                smallest[0] = min(smallest[0], page.total_items)
                read.append((offset, page.members))
            pages.write_page(sweep.kind, pass_no, offset, page.raw)

        if not offsets:
            return smallest[0], read
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
                self._progress(sweep, len(offsets) + 1)
        return smallest[0], read

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

    page_size: int = Field(1000, ge=1, le=1000)
    read_timeout_s: float = Field(60.0, description="a 1000-member page can take seconds on a big list")
    max_connections: int | None = Field(None, ge=1, le=10, description="overrides the registry's per account")
    page_overlap: int = Field(20, ge=0, le=500, description="members each page shares with the next (see fetch)")
    max_passes: int = Field(3, ge=1, description="pagings of a window that kept shrinking before the run fails")
    sweep_archived: bool = Field(True, description="also fetch members archived since the last sweep (opt-outs)")

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
