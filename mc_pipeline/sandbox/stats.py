"""Per-key counters the tests and benchmarks read: the sandbox is the witness of what a client did.

Keys are never stored here: counters are labelled `mailchimp:<client_id>` / `ometria:<client_id>`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    method: str
    route: str
    path: str
    query: dict[str, str]
    status: int
    bytes_sent: int
    started: float
    ended: float
    fault: str | None


@dataclass
class KeyStats:
    requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    throttled: int = 0  # 429s sent
    bytes_sent: int = 0
    bytes_received: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    log: deque[RequestRecord] = field(default_factory=lambda: deque(maxlen=5000))

    def as_dict(self, with_log: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "throttled": self.throttled,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "routes": dict(self.routes),
        }
        if with_log:
            out["log"] = [r.__dict__ for r in self.log]
        return out


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, KeyStats] = {}
        self.started = time.monotonic()

    def key(self, label: str) -> KeyStats:
        with self._lock:
            return self._keys.setdefault(label, KeyStats())

    def enter(self, label: str) -> int:
        """One more request in flight for `label`; returns the count including this one."""
        with self._lock:
            s = self._keys.setdefault(label, KeyStats())
            s.in_flight += 1
            s.peak_in_flight = max(s.peak_in_flight, s.in_flight)
            return s.in_flight

    def try_enter(self, label: str, limit: int) -> bool:
        """Admit one more request for `label` unless `limit` are already in flight.

        A refused request is not counted: it neither holds a slot while its 429 is written nor
        shows in `peak_in_flight`, which therefore never exceeds the limit.
        """
        with self._lock:
            s = self._keys.setdefault(label, KeyStats())
            if s.in_flight >= limit:
                return False
            s.in_flight += 1
            s.peak_in_flight = max(s.peak_in_flight, s.in_flight)
            return True

    def leave(self, label: str) -> None:
        with self._lock:
            self._keys[label].in_flight -= 1

    def record(self, label: str, rec: RequestRecord, received: int = 0) -> None:
        with self._lock:
            s = self._keys.setdefault(label, KeyStats())
            s.requests += 1
            s.bytes_sent += rec.bytes_sent
            s.bytes_received += received
            s.statuses[rec.status] += 1
            s.routes[f"{rec.method} {rec.route}"] += 1
            if rec.status == 429:
                s.throttled += 1
            s.log.append(rec)

    def snapshot(self, with_log: bool = False) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: v.as_dict(with_log) for k, v in sorted(self._keys.items())}

    def reset(self) -> None:
        with self._lock:
            # Keep in-flight counts: requests under way when the reset came still leave later.
            self._keys = {k: KeyStats(in_flight=v.in_flight) for k, v in self._keys.items()}
            self.started = time.monotonic()
