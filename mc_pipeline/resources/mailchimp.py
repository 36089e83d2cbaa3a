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
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
    AFTER_BOUND_FIELDS,
    AFTER_BOUND_FIELDS_PARAM,
    AFTER_BOUND_PAGE,
    MEMBERS_FIELDS_PARAM,
    OUR_CLOCK,
    SKEW_MARGIN_S,
    FetchResult,
    FetchStats,
    OpenSweep,
    Page,
    PageWriter,
    SweepResult,
    bound_before,
    window_params,
)
from mc_pipeline.resources.retry import HttpRetryPolicy, Retryable, retry_after
from mc_pipeline.resources.sweep import keep, page_window

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
    round_trip_s: float = 0.0  # ours: the request sent to the body read


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
        skew_margin_s: int = SKEW_MARGIN_S,
        logger: Any = None,
        allow_private_network: bool = False,
        deadline_s: float | None = None,
    ) -> None:
        self.client_id = client_id
        self.overlap = overlap
        self.max_passes = max_passes
        self.skew_margin_s = skew_margin_s
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
            sent = time.monotonic()
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
                return Response(body, orjson.loads(body), server_time(resp), time.monotonic() - sent)
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
        size_hint: int | None = None,
    ) -> FetchResult:
        """Every member whose last_changed is in (since, before], and with `sweep_archived` every
        archived one in (archived_since, before]: each page goes to `pages` as it arrives.

        A full sync's pages all start at once, with no request before them: its bound is fixed on
        our clock, `CLOCK_MARGIN_S` and `skew_margin_s` before it, and proven afterwards by every
        page's Date (else the window is paged again up to a bound they prove: `sweep.page_window`);
        the page count is `size_hint` (the list's members at its last sync) or, unknown, one page
        per connection, and each answer's total_items says how many follow. An incremental window
        is usually one page: its first page is its first request, and its window ends
        `CLOCK_MARGIN_S` before Mailchimp's own clock (the Date header) at that answer. Either way
        every change Mailchimp makes after the pages were evaluated is stamped after the bound,
        whatever the skew between its clock and ours, so it falls in the next window, never in a gap.

        The archived sweep (its own bound, from its first page) starts once a page of the members
        has answered, so a revoked key or a deleted list fails before it; it then runs alongside
        the members' pages; both share the account's connections (one gate per account).

        A full sync then lists, ids only, each sweep's members that changed after its bound
        (`_after_bound`): they exist, so the import must not judge them deleted.
        """
        full = since is None
        members = self._open(list_id, None, since, before, before_fallback, pages, size_hint)
        with ThreadPoolExecutor(1, thread_name_prefix=f"mc-archived-{list_id}") as pool:
            archived: list[Future[SweepResult]] = []

            def sweep(opened: OpenSweep, on_first: Callable[[], None]) -> SweepResult:
                result = page_window(self, opened, pages, on_first)
                if full:
                    result.after_bound = self._after_bound(list_id, result)
                    result.stats.seconds = time.monotonic() - opened.started
                return result

            def start_archived() -> None:
                if sweep_archived:
                    opening = partial(self._open, list_id, "archived", archived_since, before, before_fallback, pages)
                    archived.append(pool.submit(lambda: sweep(opening(), lambda: None)))

            result = sweep(members, start_archived)
            return FetchResult(result, archived[0].result() if archived else None)

    def _after_bound(self, list_id: str, swept: SweepResult) -> list[dict[str, Any]]:
        """The sweep's members (its status) whose last_changed is after its bound, `AFTER_BOUND_FIELDS`
        only: a full sync's pages stop at the bound, and a member that changed during the fetch (or in
        the margin) is on none of them, yet exists. Pages overlap: a member changing again while they
        are read moves to the end and the later ones move up (by one, each); the end is read last."""
        window = {**window_params(swept.before, None, swept.status), "fields": AFTER_BOUND_FIELDS_PARAM}
        window["count"] = AFTER_BOUND_PAGE
        stride = AFTER_BOUND_PAGE - min(self.overlap, AFTER_BOUND_PAGE // 2)
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            params = {**window, "offset": offset}
            rows, total = self._retried(partial(self._read_ids, list_id, params, swept.stats), swept.stats, list_id)
            out += rows
            offset += stride
            if offset >= total or not rows:
                return out

    def _read_ids(self, list_id: str, params: dict[str, Any], stats: FetchStats) -> tuple[list[dict[str, Any]], int]:
        data = self._get_once(f"/lists/{list_id}/members", params, list_id=list_id, stats=stats).data
        members = data.get("members") if isinstance(data, dict) else None
        total = data.get("total_items") if isinstance(data, dict) else None
        if not (isinstance(members, list) and isinstance(total, int)):
            raise Retryable(f"the ids at offset {params['offset']} have no 'members' list or 'total_items'")
        return [{f: m.get(f) for f in AFTER_BOUND_FIELDS} for m in members if isinstance(m, dict)], total

    def _open(
        self,
        list_id: str,
        status: str | None,
        since: datetime | None,
        before: datetime | None,
        before_fallback: datetime | None,
        pages: PageWriter,
        size_hint: int | None = None,
    ) -> OpenSweep:
        """A sweep's window: a full sync's members with no request (the bound on our clock, to be
        proven, and a guessed size); any other, its first page read and written, the bound fixed
        from its Date if not given."""
        stats, started = FetchStats(), time.monotonic()
        kind = status or "members"
        if since is None and status is None:
            proven = before is not None
            if before is None:
                before = bound_before(OUR_CLOCK.now()) - timedelta(seconds=self.skew_margin_s)
            stride, n = self.page_size - min(self.overlap, self.page_size - 1), self.max_connections
            wave = max((n - 1) * stride, self.page_size) + 1 if n > 1 else 1  # a size of n pages: one per connection
            guess = size_hint if size_hint is not None else wave
            return OpenSweep(
                list_id, kind, status, since, before, guess, None, stats, started, sized=False, proven=proven
            )
        first = self._page(list_id, 0, window_params(since, before, status), stats)
        if before is None:
            before = bound_before(first.server_time or before_fallback or datetime.now(UTC), first.round_trip_s)
        opened = OpenSweep(list_id, kind, status, since, before, first.total_items, first, stats, started)
        keep(opened, 0, first, pages)
        return opened

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
        return Page(offset, resp.body, len(members), total, resp.server_time, resp.round_trip_s)


class MailchimpResource(HttpSettings):
    """HTTP settings for every Mailchimp account; credentials come per client from the registry."""

    page_size: int = Field(default=1000, ge=1, le=1000)
    read_timeout_s: float = Field(default=60.0, description="a 1000-member page can take seconds on a big list")
    max_connections: int | None = Field(default=None, ge=1, le=10, description="overrides the registry's per account")
    page_overlap: int = Field(
        default=20, ge=0, le=500, description="members each page shares with the next (see fetch)"
    )
    max_passes: int = Field(default=3, ge=1, description="pagings of a window that kept shrinking before the run fails")
    clock_skew_margin_s: int = Field(
        default=SKEW_MARGIN_S,
        ge=0,
        le=3600,
        description="how far our clock may be ahead of Mailchimp's: a full sync's bound is our clock less "
        "this (and CLOCK_MARGIN_S), proven by the pages' Date headers, else the list is paged again",
    )
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
            skew_margin_s=self.clock_skew_margin_s,
            logger=logger,
        )
