"""The one retry policy of both API clients, and the one `Retry-After` parser.

Each client decides what an answer means: it raises `Retryable` for what may pass on a later
attempt (a throttle, a transient fault, an unreadable body) and its own error for what will not.
`HttpRetryPolicy.call` decides how long to wait and when to give up.

Why our own loop and not urllib3's `Retry` (mounted on the adapter): urllib3 decides on the status
and the exception alone, per thread. This loop also
- retries answers urllib3 has already passed: a cut or malformed JSON body, a 200 page without
  `members`, an Ometria answer whose counts do not add up to the batch;
- counts throttles apart from faults (`max_throttle_waits` vs `max_attempts`): a 429 says when to
  come back and is waited out many times; urllib3 counts a 429 and a 503 against one `status` budget;
- runs `before_attempt` before every attempt, retries included: the shared per-account rate limiter
  (so a retry counts against Ometria's 8 a second) and the stop flag (a refused key stops every
  thread of the account, even one about to retry);
- runs `on_throttle` on a 429, which holds every thread of the account back through the limiter,
  not only the thread that was told to wait;
- records every cause in the counters the assets report (`retries`, `throttled`, `retry_causes`).
What urllib3 does well, it still does: `retry_after` parses the header with its `Retry`
(seconds or an HTTP date, capped at `MAX_RETRY_AFTER_S`).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry as Urllib3Retry

T = TypeVar("T")
MAX_RETRY_AFTER_S = 120  # a server asking for longer (or a wrong header) costs a retry, not a stalled run
_RETRY_AFTER = Urllib3Retry(retry_after_max=MAX_RETRY_AFTER_S)


@dataclass
class CallStats:
    retries: int = 0
    throttled: int = 0  # 429s (and Mailchimp's edge 403s) received
    causes: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def note(self, cause: str) -> None:
        with self._lock:
            self.causes[cause] = self.causes.get(cause, 0) + 1


class Retryable(Exception):
    """An answer that may pass on a later attempt: a throttle (wait as told) or a transient fault."""

    def __init__(self, cause: str, wait_s: float | None = None, throttle: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.wait_s = wait_s
        self.throttle = throttle


def retry_after(resp: requests.Response) -> float | None:
    """`Retry-After` in seconds (delay-seconds or an HTTP date), at most `MAX_RETRY_AFTER_S`;
    None if absent or unreadable (the policy then backs off)."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(_RETRY_AFTER.parse_retry_after(value))
    except (InvalidHeader, OverflowError, ValueError):
        return None


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: uniform in [1/2, 1] of min(cap, base * 2^attempt)."""
    r = (rng or random).random()
    return min(cap_s, base_s * (2**attempt)) * (0.5 + r / 2)


@dataclass(frozen=True)
class HttpRetryPolicy:
    """How often and how long a request is tried again (not Dagster's `RetryPolicy`, which re-runs a step)."""

    max_attempts: int  # transient faults: 5xx, timeouts, dropped connections, unreadable bodies
    max_throttle_waits: int  # throttles are waited out longer: the server said when to come back
    backoff_base_s: float
    backoff_cap_s: float

    def call(
        self,
        attempt: Callable[[], T],
        stats: CallStats,
        give_up: Callable[[str], Exception],
        *,
        before_attempt: Callable[[], None] | None = None,
        on_throttle: Callable[[float], None] | None = None,
        log: Any = None,
        rng: random.Random | None = None,
    ) -> T:
        attempts = throttles = 0
        while True:
            if before_attempt is not None:
                before_attempt()
            try:
                return attempt()
            except Retryable as retry:
                stats.note(retry.cause)
                if retry.throttle:
                    throttles += 1
                    stats.add(throttled=1)
                    if throttles > self.max_throttle_waits:
                        raise give_up(f"still throttled after {throttles - 1} waits ({retry.cause})") from None
                    delay = retry.wait_s
                    if delay is None:
                        delay = backoff_delay(min(throttles, 6), self.backoff_base_s, self.backoff_cap_s, rng)
                    if on_throttle is not None:
                        on_throttle(delay)
                else:
                    attempts += 1
                    if attempts >= self.max_attempts:
                        raise give_up(f"gave up after {attempts} attempts; last cause: {retry.cause}") from None
                    delay = backoff_delay(attempts - 1, self.backoff_base_s, self.backoff_cap_s, rng)
                stats.add(retries=1)
                if log is not None:
                    log.debug(f"{retry.cause}; retrying in {delay:.2f}s")
                time.sleep(delay)
