"""Paging one sweep of a window: every page concurrently, overlapping, the window paged again until
no member can have been skipped (`page_window`); `MailchimpClient.fetch` opens the sweeps.

Why no member is skipped although offsets move under concurrent changes: with both bounds fixed,
and no change committed after the pass's first evaluation stamped at or before `before`, a change
can only take a member *out* of the window (its new last_changed is past `before`), so the window
only shrinks and a member's position only decreases, by at most the shrink: the largest
total_items any page of a pass saw (the earliest evaluated) less the smallest. Pages overlap by
`overlap` members; if the window shrank by no more than that during the pass, every member that
stayed was on some page. Otherwise the window is paged again, with a wider overlap. A page that
returns fewer members than its own total promises leaves positions no page read (a gap): the
window is paged again too; the counts of the last pass are in the result.

A bound taken from our clock (a full sync's, fixed before any request) is proven by the pass's
own answers: each Date, less the margin `bound_before` keeps, is an instant after which every
change Mailchimp commits is stamped later than that bound; if every page's is no earlier than
`before`, so is the earliest evaluated page's, and the window only shrank from the pass's start.
If one is earlier (our clock ahead of Mailchimp's by more than the skew margin), the window may
have grown under the pass: it is discarded and the window paged again up to the latest bound an
answer proved, which holds for every page of the next pass since each is evaluated after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mc_pipeline.resources.errors import MailchimpUnavailable
from mc_pipeline.resources.paging import (
    OpenSweep,
    Page,
    PageWriter,
    SweepResult,
    bound_before,
    covered,
    gaps_below,
    window_params,
)

if TYPE_CHECKING:
    from mc_pipeline.resources.mailchimp import MailchimpClient


def keep(sweep: OpenSweep, pass_no: int, page: Page, pages: PageWriter) -> None:
    """Count a page and hand it to `pages`, unless it lies wholly past the window's end (a page
    a guessed size asked for): it holds no member and no position."""
    if page.past_the_end:
        return
    sweep.stats.add(pages=1, rows=page.members)
    pages.write_page(sweep.kind, pass_no, page.offset, page.raw)


@dataclass
class _Pass:
    """One pass over a window: which offsets went out, and what their answers said."""

    stride: int
    page_size: int
    size: int  # offsets that reach it are needed: a guess until the first answer when not `sized`
    sized: bool
    check: datetime | None  # a bound still to prove, or None
    wave: int  # offsets out at once while the size is a guess: one per connection
    next: int = 0
    in_flight: int = 0
    stop: bool = False
    totals: list[int] = field(default_factory=list)
    read: list[tuple[int, int]] = field(default_factory=list)  # (offset, rows) of each page
    proven_until: datetime | None = None  # the latest bound an answer proved
    disproved: bool = False

    def needed(self) -> bool:
        """The next offset: page 0 always; after it, as `next_offsets` pages a window of `size`, and
        while `size` is a guess no more than a wave (a thread waiting at the gate would send its page
        after the first answer showed it past the end)."""
        if not self.sized and self.in_flight >= self.wave:
            return False
        return self.next == 0 or (self.next < self.size and self.size > self.page_size)

    def answered(self, page: Page) -> None:
        self.in_flight -= 1
        self.totals.append(page.total_items)
        self.read.append((page.offset, page.members))
        self.size = max(self.size, page.total_items) if self.sized else page.total_items
        self.sized = True
        if page.server_time is not None:
            proves = bound_before(page.server_time, page.round_trip_s)
            self.proven_until = max(self.proven_until or proves, proves)
            if self.check is not None and proves < self.check:
                self.disproved = self.stop = True


def page_window(mc: MailchimpClient, sweep: OpenSweep, pages: PageWriter, on_first: Callable[[], None]) -> SweepResult:
    """Every page of the sweep's window into `pages`, in as many passes as it takes (see the module's
    docstring); `on_first` runs once, when the sweep's first page has answered."""
    overlap = min(mc.overlap, mc.page_size - 1)
    first, before, proven, size, sized = sweep.first, sweep.before, sweep.proven, sweep.total, sweep.sized
    passes, allowed, lock, started = 1, mc.max_passes, threading.Lock(), [first is not None]

    def once() -> None:
        with lock:
            if started[0]:
                return
            started[0] = True
        on_first()

    if first is not None:
        on_first()
    while True:
        window = window_params(sweep.since, before, sweep.status)
        todo = _Pass(mc.page_size - overlap, mc.page_size, size, sized, None if proven else before, mc.max_connections)
        done = _page_pass(mc, sweep, window, todo, first, passes - 1, pages, once)
        if done.disproved and done.proven_until is not None:
            mc.log.warning(
                f"Mailchimp {mc.client_id} list {sweep.list_id} {sweep.kind}: the bound {before.isoformat()} from our "
                "clock is later than Mailchimp's Date headers allow (our clock is ahead of Mailchimp's by more than "
                f"the skew margin); paging the window again up to {done.proven_until.isoformat()}"
            )
            # The discarded pass is not one of the `max_passes` a shrinking window is allowed.
            before, proven, allowed = done.proven_until, True, allowed + 1
            size, sized = max(done.totals), False
        else:
            total_first = max(done.totals)
            total_last = min(done.totals)
            gaps = gaps_below(done.read, total_last)
            if total_first - total_last <= overlap and not gaps:
                break
            # A shrink past the overlap may have skipped members; a gap is positions no page returned.
            cause = (
                f"pages returned no member at window positions {', '.join(f'{a}..{b - 1}' for a, b in gaps[:5])}"
                if gaps
                else f"the window shrank by {total_first - total_last} members while it was paged, more than "
                f"the {overlap}-member overlap"
            )
            if passes >= allowed:
                raise MailchimpUnavailable(
                    f"{cause}, in each of {passes} passes; members may have been skipped",
                    client_id=mc.client_id,
                    list_id=sweep.list_id,
                )
            mc.log.warning(f"Mailchimp {mc.client_id} list {sweep.list_id}: {cause}; paging it again")
            overlap = min(max(overlap, 2 * (total_first - total_last)), mc.page_size // 2)
            size, sized = total_last, True
        passes += 1
        first = None  # every page of the next pass at once
    sweep.stats.seconds = time.monotonic() - sweep.started
    return SweepResult(
        sweep.since, before, sweep.status, total_first, total_last, passes, overlap, sweep.stats, covered(done.read)
    )


def _page_pass(
    mc: MailchimpClient,
    sweep: OpenSweep,
    window: dict[str, Any],
    p: _Pass,
    first: Page | None,
    pass_no: int,
    pages: PageWriter,
    on_answer: Callable[[], None],
) -> _Pass:
    """One pass: each thread takes the next offset the answers so far call for (a page's total_items
    replaces a guessed size at once, so none waits), until none is needed and none is in flight, or
    an answer disproves the bound; the first error stops it and is raised. Logs progress every 10 s."""
    if first is not None:
        p.totals.append(first.total_items)
        p.read.append((0, first.members))
        p.next = p.stride
    cond = threading.Condition()

    def take() -> int | None:
        with cond:
            while not p.stop:
                if p.needed():
                    p.next, p.in_flight = p.next + p.stride, p.in_flight + 1
                    return p.next - p.stride
                if not p.in_flight:
                    return None
                cond.wait()
            return None

    def work() -> None:
        while (offset := take()) is not None:
            try:
                page = mc._page(sweep.list_id, offset, window, sweep.stats)
            except BaseException:
                with cond:
                    p.in_flight, p.stop = p.in_flight - 1, True
                    cond.notify_all()
                raise
            with cond:
                p.answered(page)
                cond.notify_all()
            on_answer()
            keep(sweep, pass_no, page, pages)

    # Twice as many threads as connections: while one thread parses and writes the page it received,
    # another, waiting at the account's gate, takes the connection at once (`MailchimpClient._get_once`).
    threads = 2 * mc.max_connections
    with ThreadPoolExecutor(threads, thread_name_prefix=f"mc-{sweep.list_id}") as pool:
        pending = {pool.submit(work) for _ in range(threads)}
        while pending:
            done, pending = wait(pending, timeout=5.0, return_when=FIRST_EXCEPTION)
            for fut in done:
                exc = fut.exception()
                if exc is not None:
                    raise exc
            _progress(mc, sweep, p)
    return p


def _progress(mc: MailchimpClient, sweep: OpenSweep, p: _Pass) -> None:
    if time.monotonic() - sweep.logged < 10:
        return
    sweep.logged = time.monotonic()
    s = sweep.stats
    planned = 1 + max(0, -(-(p.size - p.page_size) // p.stride))
    mc.log.info(
        f"Mailchimp {mc.client_id} list {sweep.list_id} {sweep.kind}: {s.pages}/{planned} pages "
        f"({s.rows} rows, the pages' overlap included), {s.calls} calls, {s.retries} retries"
    )
