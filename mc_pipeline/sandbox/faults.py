"""Fault injection: seeded rates per server and per list, and exact scripts for tests.

A script ("the next three member requests of list X answer 500, drop, 429") makes a test's
outcome certain; rates make soak tests and benchmarks realistic. Scripts win over rates.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from typing import cast

from mc_pipeline.sandbox.config import FaultKind, Faults

SERVERS = ("mailchimp", "ometria")


class FaultPlan:
    def __init__(self, seed: int, server_rates: dict[str, Faults]) -> None:
        self._rng = random.Random(f"{seed}:faults")
        self._lock = threading.Lock()
        self._rates: dict[str, Faults] = dict(server_rates)  # target -> rates
        self._scripts: dict[str, deque[FaultKind]] = {}
        self.injected: dict[str, int] = {}  # kind -> count, for reports

    def set_rates(self, target: str, faults: Faults | None) -> None:
        """`target`: a server name, a Mailchimp list id or a client id (its Ometria account)."""
        with self._lock:
            if faults is None or not faults.any():
                self._rates.pop(target, None)
            else:
                self._rates[target] = faults

    def rates(self, target: str) -> Faults | None:
        with self._lock:
            return self._rates.get(target)

    def script(self, target: str, kinds: list[str]) -> None:
        """Queue exact faults for the next requests that reach `target`, one per request."""
        allowed = set(FaultKind.__args__)  # type: ignore[attr-defined]
        unknown = [k for k in kinds if k not in allowed]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {sorted(allowed)}")
        with self._lock:
            self._scripts.setdefault(target, deque()).extend(cast(list[FaultKind], kinds))

    def pending(self, target: str) -> int:
        with self._lock:
            return len(self._scripts.get(target, ()))

    def clear(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._rates = {k: v for k, v in self._rates.items() if k in SERVERS}

    def draw(self, targets: tuple[str, ...]) -> tuple[FaultKind | None, Faults]:
        """The fault for one request, most specific target first; also the rates that timed it."""
        with self._lock:
            for target in targets:
                queue = self._scripts.get(target)
                if queue:
                    kind = queue.popleft()
                    self.injected[kind] = self.injected.get(kind, 0) + 1
                    # Delays come from the most specific target that has settings, else the server's.
                    timing = next((self._rates[t] for t in targets if t in self._rates), Faults())
                    return kind, timing
            for target in targets:
                rates = self._rates.get(target)
                if rates is None:
                    continue
                drawn = self._from_rates(rates)
                if drawn is not None:
                    self.injected[drawn] = self.injected.get(drawn, 0) + 1
                    return drawn, rates
            return None, Faults()

    def _from_rates(self, f: Faults) -> FaultKind | None:
        r = self._rng.random()
        for rate, kind in (
            (f.error_rate, "500" if self._rng.random() < 0.5 else "503"),
            (f.gateway_timeout_rate, "504"),
            (f.drop_rate, "drop"),
            (f.truncate_rate, "truncate"),
            (f.slow_rate, "slow"),
        ):
            if r < rate:
                return cast(FaultKind, kind)
            r -= rate
        return None
