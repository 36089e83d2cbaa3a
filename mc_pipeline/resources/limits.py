"""Process-wide limits shared by every client of one account: connections in flight and request rate.

Keyed by a fingerprint of the account's key (never the key), so that two lists of one account
synced by the same process share one budget, whatever the number of threads.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable

_lock = threading.Lock()
_gates: dict[str, threading.BoundedSemaphore] = {}
_limiters: dict[str, SlidingWindowLimiter] = {}


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a key: safe to use as a label."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


def account_gate(name: str, limit: int) -> threading.BoundedSemaphore:
    """The semaphore bounding requests in flight for one account in this process."""
    with _lock:
        gate = _gates.get(name)
        if gate is None or gate._initial_value != limit:  # type: ignore[attr-defined]
            gate = _gates[name] = threading.BoundedSemaphore(limit)
        return gate


def account_limiter(name: str, rate: float, window_s: float = 1.0) -> SlidingWindowLimiter:
    with _lock:
        limiter = _limiters.get(name)
        if limiter is None or limiter.rate != rate:
            limiter = _limiters[name] = SlidingWindowLimiter(rate, window_s)
        return limiter


class SlidingWindowLimiter:
    """At most `rate` starts in any window of `window_s`, plus a margin for network jitter.

    A token bucket would allow 2x the rate across a window boundary and earn 429s from a server
    that counts a sliding window; this keeps the log of the last `rate` starts instead.

    The margin adapts: a request that left on time can still reach the server late (a loaded
    machine, a slow network) and land in the same server window as the one `rate` starts later.
    Each 429 doubles the margin (up to `max_margin_s`); each start shrinks it by `decay` back
    towards `margin_s` (at 8/s, halfway in about 45 s), so a quiet machine keeps the full rate and
    a busy one, whose delays come and go, stops earning 429s (each costs a whole Retry-After).

    Starts are also paced, one every `window / rate`: the same rate as bursts of `rate` at once,
    but many accounts' bursts arriving together queue at the server, which then stamps them late
    and unevenly (measured: 10 clients in bursts earned 30 429s in 20 s; paced, none).
    """

    def __init__(
        self,
        rate: float,
        window_s: float = 1.0,
        margin_s: float = 0.03,
        max_margin_s: float | None = None,
        decay: float = 0.998,
        now: Callable[[], float] = time.monotonic,
        wait: Callable[[threading.Condition, float], object] | None = None,
    ) -> None:
        # `now` and `wait` are the clock: tests give a simulated one, so pacing is judged exactly,
        # not by when a loaded machine happens to schedule the thread.
        self._now = now
        self._wait = wait or (lambda cond, seconds: cond.wait(seconds))
        self.rate = rate
        self.capacity = max(1, int(rate))
        self.base_window = window_s * self.capacity / rate
        self.min_margin = margin_s
        self.max_margin = max_margin_s if max_margin_s is not None else 0.25 * self.base_window
        self.margin = margin_s
        self.decay = decay
        self._starts: deque[float] = deque()
        self._cond = threading.Condition()

    @property
    def window(self) -> float:
        return self.base_window + self.margin

    @property
    def spacing(self) -> float:
        return self.window / self.capacity

    def acquire(self) -> None:
        with self._cond:
            while True:
                now = self._now()
                while self._starts and now - self._starts[0] >= self.window:
                    self._starts.popleft()
                wait = self.window - (now - self._starts[0]) if len(self._starts) >= self.capacity else 0.0
                if self._starts:
                    wait = max(wait, self._starts[-1] + self.spacing - now)
                if wait <= 0:
                    self._starts.append(now)
                    self.margin = max(self.min_margin, self.margin * self.decay)
                    return
                self._wait(self._cond, wait)

    def penalise(self, seconds: float) -> None:
        """After a 429, hold every caller back: the server's window is fuller than ours thought."""
        with self._cond:
            self.margin = min(self.max_margin, max(2 * self.margin, self.min_margin + 0.02))
            until = self._now() + seconds
            self._starts.extend([until - self.window] * self.capacity)
            while len(self._starts) > self.capacity:
                self._starts.popleft()
