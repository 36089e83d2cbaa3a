"""How a window was paged and what was read: the counts every report of a fetch is made of.

Pages overlap (see `MailchimpClient.fetch_window`), so rows received are not members: a
position read twice is overlap. What the last pass read is kept as (offset, rows) spans, which
give the distinct positions read and any gap a page left (a member no page returned).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mc_pipeline.resources.http import CallStats


@dataclass
class Page:
    offset: int
    raw: bytes  # exactly as received
    members: int
    total_items: int
    server_time: datetime | None = None


@dataclass
class FetchStats(CallStats):
    calls: int = 0  # HTTP requests sent, retries included
    bytes: int = 0
    pages: int = 0
    rows: int = 0  # members on the pages received: the pages' overlap and repeated passes included
    seconds: float = 0.0


@dataclass
class WindowFetch:
    """How one window was fetched, and the proof that no member was skipped."""

    since: datetime | None
    before: datetime
    status: str | None
    total_first: int  # total_items when the first page was evaluated
    total_last: int  # the smallest total_items any page saw: the window only shrinks during a run
    passes: int
    overlap: int
    stats: FetchStats
    members: int = 0  # distinct window positions the last pass read: on a static list, its distinct members

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
