"""What both API clients share: a pooled session, counters, and the retry loop of the error policy.

Each client decides what an answer means (raising `Retry` for what may pass on a second try,
its own error for what may not); this loop decides how long to wait and when to give up.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
from dagster import ConfigurableResource
from pydantic import Field
from requests.adapters import HTTPAdapter

from mc_pipeline.resources.limits import backoff_delay

T = TypeVar("T")


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


class Retry(Exception):
    """An answer that may pass on a later attempt: a throttle (wait as told) or a transient fault."""

    def __init__(self, cause: str, wait_s: float | None = None, throttle: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.wait_s = wait_s
        self.throttle = throttle


@dataclass(frozen=True)
class RetryPolicy:
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
            except Retry as retry:
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


def pooled_session(pool_size: int, headers: dict[str, str]) -> requests.Session:
    """One keep-alive pool per account; `pool_block` makes threads wait for a connection."""
    session = requests.Session()
    session.headers.update({"User-Agent": "mc-pipeline/0.1 (+requests)", **headers})
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0, pool_block=True)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class HttpSettings(ConfigurableResource):
    """The settings both API resources share: timeouts and the retry policy."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_attempts: int = Field(6, ge=1, description="per request, for 5xx, timeouts, drops and unreadable bodies")
    max_throttle_waits: int = Field(60, ge=0, description="per request, for throttling answers")
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.max_throttle_waits, self.backoff_base_s, self.backoff_cap_s)

    def timeouts(self) -> tuple[float, float]:
        return (self.connect_timeout_s, self.read_timeout_s)
