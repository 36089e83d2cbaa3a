"""When the registry sensor may delete partitions, and when it holds the registry instead.

A registry read while it is being rewritten can be empty (refused when loaded) or cut short at a
point where what is left still parses: a file with fewer clients, or a client with fewer lists.
`lists: all` can shrink the same way when Mailchimp answers with part of an account's audiences.
Deleting partitions on such a reading would drop lists that are still wanted (and their initial
syncs would not run again). So:
- a deletion waits until two consecutive ticks read the same registry (`reading`): a file being
  rewritten is not still half-written a tick later;
- a tick that would delete `SHARE` (half) of the partitions or more (and more than `FEW`), or
  that lists half as many lists as the last registry accepted or fewer, changes nothing and says
  why, however long it lasts (a writer that died mid-file), until every client (or `client:list`)
  taken out on purpose is named under `removed:` in the registry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

FEW = 3  # this many deletions per tick never need a confirmation
SHARE = 0.5  # this share of the partitions, or of the last registry's lists, or more, does

CONFIRM_HINT = (
    "If these lists really left the registry, name their clients (or `client:list` keys) under "
    "`removed:` in the registry file; their partitions are then deleted on the next tick (README, 'Removing clients')."
)


@dataclass(frozen=True)
class Shrink:
    """What this tick's registry would remove, split by whether the registry says it is on purpose."""

    existing: int  # partitions now
    confirmed: list[str]  # deletions the registry names under `removed`
    unconfirmed: list[str]  # deletions it does not: the list just is not there any more
    size: int  # lists the registry stands for now (unresolved `lists: all` clients count what they have)
    last_size: int | None  # lists of the last registry the sensor accepted

    def refusal(self) -> str | None:
        """Why the tick must change nothing, or None when its deletions may go ahead."""
        base = self.existing - len(self.confirmed)
        if len(self.unconfirmed) > FEW and len(self.unconfirmed) >= SHARE * base:
            return (
                f"it would delete {len(self.unconfirmed)} of {base} partitions at once "
                f"(e.g. {', '.join(self.unconfirmed[:5])}), {SHARE:.0%} or more"
            )
        if self.last_size:
            drop = self.last_size - self.size - len(self.confirmed)
            if drop > FEW and drop >= SHARE * self.last_size:
                return (
                    f"it lists {self.size} lists where the last registry accepted listed {self.last_size}: "
                    f"{drop} fewer, {SHARE:.0%} or more"
                )
        return None


def shrink(
    existing: Collection[str],
    gone: list[str],
    size: int,
    last_size: int | None,
    removes: Callable[[str], bool],
) -> Shrink:
    confirmed = [k for k in gone if removes(k)]
    unconfirmed = [k for k in gone if not removes(k)]
    return Shrink(len(existing), confirmed, unconfirmed, size, last_size)


def reading(keys: Iterable[str]) -> str:
    """A short fingerprint of the partitions a registry stands for, to tell two readings apart."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
