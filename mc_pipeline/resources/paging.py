"""How a window was paged and what was read: the counts every report of a fetch is made of.

`MailchimpClient.fetch` pages a window in two sweeps (the members, then the archived ones),
hands each page to a `PageWriter` and returns a `FetchResult`.

Pages overlap (see `sweep.page_window`), so rows received are not members: a
position read twice is overlap. What the last pass read is kept as (offset, rows) spans, which
give the distinct positions read and any gap a page left (a member no page returned).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from mc_pipeline.resources.retry import CallStats

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
MEMBERS_FIELDS_PARAM = ",".join([f"members.{f}" for f in MEMBER_FIELDS] + ["total_items"])
# A full sync's listing of the members that changed after its bound: what their Ometria id is made of
# (`transform.contact_ids`), nothing else.
AFTER_BOUND_FIELDS = ("contact_id", "unique_email_id")
AFTER_BOUND_FIELDS_PARAM = ",".join([*(f"members.{f}" for f in AFTER_BOUND_FIELDS), "total_items"])
AFTER_BOUND_PAGE = 1000

# A window's upper bound is Mailchimp's clock at an answer (the Date header, whole seconds) minus this, for
# the schedule's probes and the syncs alike: a change committed after the request was evaluated is stamped
# no earlier than the second of the evaluation, which is at least the Date's second minus one when the
# answer takes under a second; so the bound is before every such change, which falls in the next window.
CLOCK_MARGIN_S = 2
# How far our clock may be ahead of Mailchimp's for a full sync's bound, taken from ours (less both margins),
# to be proven by the pages' Date headers (`MailchimpResource.clock_skew_margin_s`'s default).
SKEW_MARGIN_S = 5


class OurClock:
    """Our clock, which a full sync's bound is taken from before any request: the machine's, plus an
    offset only tests move, with the sandbox's clock, so that time passes for both without waiting
    (`mc_pipeline_tests.helpers.settle`); moving the sandbox's alone is a skew between the two."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset_s)


OUR_CLOCK = OurClock()


def bound_before(clock: datetime, round_trip_s: float = 0.0) -> datetime:
    """The latest upper bound a window may have, given Mailchimp's clock at an answer that took
    `round_trip_s` on our clock: the request was evaluated no earlier than its Date less that round
    trip, so each second of it past the first costs a second more (none for the probes' counts)."""
    slack = max(0, math.ceil(round_trip_s) - 1)
    return clock.replace(microsecond=0) - timedelta(seconds=CLOCK_MARGIN_S + slack)


@dataclass
class Page:
    offset: int
    raw: bytes  # exactly as received
    members: int
    total_items: int
    server_time: datetime | None = None
    round_trip_s: float = 0.0  # on our clock, from sending the request to the end of its body

    @property
    def past_the_end(self) -> bool:
        """Wholly beyond the window (a guessed page count's): nothing to read, write or count."""
        return self.members == 0 and self.total_items <= self.offset and self.offset > 0


@dataclass
class FetchStats(CallStats):
    calls: int = 0  # HTTP requests sent, retries included
    bytes: int = 0
    pages: int = 0
    rows: int = 0  # members on the pages received: the pages' overlap and repeated passes included
    seconds: float = 0.0


@dataclass
class OpenSweep:
    """A sweep about to be paged: its window, its size as far as known (`total`), its first page if
    one was read to fix the bound, and its counters so far.

    `sized`: `total` is at least the window's size (a page's total_items); else a guess (the list's
    history, or one page per connection) that the first answer replaces. `proven`: no change
    committed after the first page's evaluation can be stamped `before` or earlier (the bound came
    from Mailchimp's clock, or was given); else it came from our clock and every page's Date must
    prove it (see `sweep.page_window`)."""

    list_id: str
    kind: str  # "members" or "archived": the pages' file names
    status: str | None
    since: datetime | None
    before: datetime
    total: int
    first: Page | None
    stats: FetchStats
    started: float
    logged: float = field(default_factory=time.monotonic)  # when progress was last logged
    sized: bool = True
    proven: bool = True


def window_params(
    since: datetime | None, before: datetime | None, status: str | None, sort: bool = True
) -> dict[str, Any]:
    """The query of a window, ordered by last_changed so pages are chronological and a window is a stable
    slice (a count needs no order)."""
    params: dict[str, Any] = {"sort_field": "last_changed", "sort_dir": "ASC"} if sort else {}
    if since is not None:
        params["since_last_changed"] = since.isoformat(timespec="seconds")
    if before is not None:
        params["before_last_changed"] = before.isoformat(timespec="seconds")
    if status is not None:
        params["status"] = status
    return params


def next_offsets(total: int, page_size: int, overlap: int) -> list[int]:
    """The offsets after the first page's: each page shares `overlap` members with the previous one."""
    if total <= page_size:
        return []
    return list(range(page_size - overlap, total, page_size - overlap))


class PageWriter(Protocol):
    """Where pages go as they arrive, so none stays in memory. Called from the fetching threads:
    it must be thread-safe. `kind` is "members" or "archived"; a window paged twice is written
    once per pass (`pass_no`). `RunFolder` (storage.py) gzips each into the run's folder."""

    def write_page(self, kind: str, pass_no: int, offset: int, raw: bytes) -> None: ...


@dataclass
class SweepResult:
    """How one sweep of a window (its members, or its archived members) was fetched, and the
    proof that no member was skipped."""

    since: datetime | None
    before: datetime
    status: str | None
    total_first: int  # total_items when the first page was evaluated
    total_last: int  # the smallest total_items any page saw: the window only shrinks during a run
    passes: int
    overlap: int
    stats: FetchStats
    members: int = 0  # distinct window positions the last pass read: on a static list, its distinct members
    # On a full sync: the members that changed after `before` (not on the pages, yet they exist), their
    # `AFTER_BOUND_FIELDS` only, so that the import never judges them deleted.
    after_bound: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shrank_by(self) -> int:
        return self.total_first - self.total_last

    @property
    def rows(self) -> int:
        """Rows received, every page of every pass."""
        return self.stats.rows

    @property
    def overlap_rows(self) -> int:
        """Rows at a position read before: the pages' overlap, and every row of an earlier pass."""
        return self.stats.rows - self.members


@dataclass(frozen=True)
class FetchResult:
    """A whole fetch: the members' sweep and, if asked for, the archived sweep, and their sums."""

    members: SweepResult
    archived: SweepResult | None = None

    @property
    def sweeps(self) -> list[SweepResult]:
        return [self.members, *([self.archived] if self.archived is not None else [])]

    def total(self, count: str) -> int:
        """A counter of `FetchStats` (calls, bytes, pages, rows, retries, throttled), summed over the sweeps."""
        return sum(getattr(s.stats, count) for s in self.sweeps)

    @property
    def seconds(self) -> float:
        return sum(s.stats.seconds for s in self.sweeps)

    @property
    def after_bound(self) -> list[dict[str, Any]]:
        """Every sweep's members that changed after its bound (a full sync's; see `SweepResult`)."""
        return [m for s in self.sweeps for m in s.after_bound]

    @property
    def overlap_rows(self) -> int:
        return sum(s.overlap_rows for s in self.sweeps)

    @property
    def causes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sweeps:
            for cause, n in s.stats.causes.items():
                out[cause] = out.get(cause, 0) + n
        return out


def covered(spans: list[tuple[int, int]]) -> int:
    """Positions in the union of [offset, offset + rows) spans."""
    read = end = 0
    for start, n in sorted(spans):
        read += max(0, start + n - max(start, end))
        end = max(end, start + n)
    return read


def gaps_below(spans: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    """[start, end) ranges of positions below `total` that no span covers: members no page returned."""
    gaps: list[tuple[int, int]] = []
    end = 0
    for start, n in sorted(spans):
        if start > end and end < total:
            gaps.append((end, min(start, total)))
        end = max(end, start + n)
    if end < total:
        gaps.append((end, total))
    return gaps
