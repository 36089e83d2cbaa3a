"""The sandbox's clock: wall time plus an offset that tests can set or advance."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime


class SandboxClock:
    """`last_changed` of every mutation comes from here, at Mailchimp's one-second resolution.

    It follows wall time by default so that a pipeline whose window ends at its run's start sees
    the sandbox's changes; `advance` and `set` shift it for tests that need a specific instant.
    """

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return time.time() + self._offset

    def now_s(self) -> int:
        return int(self.now())

    def now_dt(self) -> datetime:
        return datetime.fromtimestamp(self.now_s(), UTC)

    def set(self, when: datetime | float) -> None:
        target = when.timestamp() if isinstance(when, datetime) else float(when)
        with self._lock:
            self._offset = target - time.time()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds

    def reset(self) -> None:
        with self._lock:
            self._offset = 0.0
