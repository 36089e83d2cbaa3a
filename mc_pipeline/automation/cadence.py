"""When each list is probed: a stable slot per list in a cycle a little shorter than the promise.

The promise is `every_s` (`MC_PIPELINE_VERIFY_EVERY_MIN`, an hour by default): every list verified
or synced within every `every_s`. The schedule ticks every `tick_s` and each list is probed once a
cycle of `every_s - 2 * tick_s`, at the tick its slot falls in. The two ticks left over are what
makes the promise hold by construction: one for a probe deferred because the list's account had
a run in progress at its slot (probed at the next tick instead), one for the probe's answer and
record or a changed list's import. So the largest staleness, a cycle plus a deferral plus the
lag, stays within `every_s` whenever the import ends within a tick of its probe (README,
"Change-aware").
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timedelta


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


@dataclass(frozen=True)
class Cadence:
    """The promise (`every_s`), the schedule's tick (`tick_s`) and the probe cycle between them.

    `MC_PIPELINE_VERIFY_EVERY_MIN` (default 60; a divisor of 60, e.g. 5 for near-real-time) and
    `MC_PIPELINE_PROBE_TICK_MIN` (default a twelfth of it, at least 1; a divisor of it, at most a
    third of it). A cron in `MC_PIPELINE_INCREMENTAL_CRON` (demos, benchmarks) replaces both:
    every tick takes every list.
    """

    every_s: int = 3600
    tick_s: int = 300
    cron_override: str | None = None

    def __post_init__(self) -> None:
        if (
            self.every_s <= 0
            or 3600 % self.every_s
            or self.tick_s <= 0
            or self.every_s % self.tick_s
            or self.every_s < 3 * self.tick_s
        ):
            raise ValueError(
                f"MC_PIPELINE_VERIFY_EVERY_MIN ({self.every_s / 60:g}) must divide 60 and "
                f"MC_PIPELINE_PROBE_TICK_MIN ({self.tick_s / 60:g}) must divide it, at most a third of it"
            )

    @classmethod
    def from_env(cls) -> Cadence:
        every = env_int("MC_PIPELINE_VERIFY_EVERY_MIN", 60)
        tick = env_int("MC_PIPELINE_PROBE_TICK_MIN", max(1, every // 12))  # 12 ticks in each promise
        return cls(every * 60, tick * 60, os.environ.get("MC_PIPELINE_INCREMENTAL_CRON") or None)

    @property
    def cycle_s(self) -> int:
        """Seconds between two probes of a list: the promise less a tick for a deferral and one
        for the lag."""
        return self.every_s - 2 * self.tick_s

    @property
    def cron(self) -> str:
        if self.cron_override:
            return self.cron_override
        return "0 * * * *" if self.tick_s == 3600 else f"*/{self.tick_s // 60} * * * *"

    def slot(self, key: str) -> int:
        """Seconds into the cycle: stable for a key, uniform over keys."""
        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % self.cycle_s

    def slot_in_tick(self, key: str, tick: datetime) -> datetime | None:
        """When the key's slot falls in the tick [tick, tick + tick_s), that instant (the run key's
        period: one run per list and cycle however often it is asked for); otherwise None."""
        if self.cron_override:
            return tick
        ahead = (self.slot(key) - int(tick.timestamp())) % self.cycle_s
        return tick + timedelta(seconds=ahead) if ahead < self.tick_s else None

    def deferred_slot(self, key: str, tick: datetime) -> datetime | None:
        """The key's slot if it fell in the previous tick: a list that tick could not probe (its
        account had a run in progress) is probed in this one."""
        if self.cron_override:
            return None
        return self.slot_in_tick(key, tick - timedelta(seconds=self.tick_s))

    def proved_at_its_tick(self, proved_at: float | None, tick: datetime) -> bool:
        """Whether a list whose slot fell in the previous tick was verified or imported since that
        tick began (`proved_at`: when its latest verification or import was recorded). Both times
        are our clock, the tick's and the record's: a list the previous tick verified was written
        after it began, a list it deferred was last proved before (a cycle before, or its initial
        sync). A clock skew between the daemon and the code server costs at most a second probe."""
        previous = tick - timedelta(seconds=self.tick_s)
        return proved_at is not None and proved_at >= previous.timestamp()
