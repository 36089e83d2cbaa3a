"""What a push to Ometria did: its counts (`PushStats`), one answer (`PushResult`), each record
Ometria will not hold (`Refusal`) and the dead letters of those (`PushOutcome`). Made by the
fan-out (`ometria_push`), read by the import and the dead-letter replay."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mc_pipeline.dead_letters import dead_letter
from mc_pipeline.resources.retry import CallStats


@dataclass
class PushStats(CallStats):
    requests: int = 0  # POST /push, retries included
    batches: int = 0  # answered 2xx
    pushed: int = 0  # records in batches Ometria acknowledged
    accepted: int = 0  # as the answers counted them
    rejected: int = 0
    resent: int = 0  # requests sent again to isolate a request Ometria refused as a whole
    lookups: int = 0  # GET /push/_errors
    failed_after_answer: int = 0  # records an answer accepted that failed Ometria's validation later
    seconds: float = 0.0


@dataclass(frozen=True)
class PushResult:
    accepted: int
    rejected: int
    request_id: str | None


@dataclass(frozen=True)
class Refusal:
    """A record Ometria will not hold: the caller's batch ordinal and the record's place in it."""

    batch: int
    position: int
    reason: str
    request_id: str | None = None
    by_ometria: bool = True  # False: refused here, before sending (over the size limit)


@dataclass
class PushOutcome:
    refused: list[Refusal] = field(default_factory=list)

    def dead_letters(self, batches: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The refused records as dead letters; `batches` are the pushed ones again, in order."""
        wanted: dict[int, list[Refusal]] = {}
        for r in self.refused:
            wanted.setdefault(r.batch, []).append(r)
        out: list[dict[str, Any]] = []
        for ordinal, batch in enumerate(batches):
            for r in wanted.pop(ordinal, ()):
                record = batch[r.position]
                out.append(dead_letter("import", None, record.get("id"), f"Ometria: {r.reason}", record))
            if not wanted:
                break
        return out
