"""The Ometria push fan-out: batches in, a `PushOutcome` out (`OmetriaClient.push_batches`).

- A few threads push at the account's rate (the client's limiter); a bounded queue keeps memory flat.
- The first refusal that will not pass (401/403 key, 402 quota, retries exhausted, a systemic
  rejection) sets the client's stop flag: no thread sends another request, retries included.
- Ometria validates asynchronously: its answer counts what it refused at once, and a record may
  still fail later. Both kinds are listed at `GET /push/_errors`; after the push, the errors of
  every request it made are looked up by request_id (50 requests per lookup) and tied to a record
  by the request and the record's place in it, never to the newest error of another thread.
- A request refused as a whole (400) is isolated: the record it names is taken out, else it is
  halved, within a budget of extra requests (a quarter of the push's, plus one halving).
- A systemic rejection (half the records of the first batches, or of all so far) stops the import
  with one failure that names Ometria's reason.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from mc_pipeline.dead_letters import dead_letter
from mc_pipeline.resources.errors import OmetriaBatchRejected, OmetriaError
from mc_pipeline.resources.retry import CallStats
from mc_pipeline.transform import encode_records

FIRST_BATCHES = 3  # judged before any more is pushed
SYSTEMIC_SHARE = 0.5  # of the records sent, refused by Ometria
EXTRA_SHARE = 0.25  # isolation requests allowed, as a share of the push's batches
EXTRA_FLOOR = 14  # plus one halving of a 100-record batch down to its one bad record
LOOKUP_CHUNK = 50  # request ids per `GET /push/_errors`
_INDEX = re.compile(r"\[(\d+)\]")


class OmetriaSystemicRejection(OmetriaError):
    """Ometria refuses most records, or whole requests beyond the isolation budget: a mapping bug or
    a changed rule, not bad members. Not retried: someone has to look."""


class PushStopped(OmetriaError):
    """Another thread met a refusal that stops the account's pushes; this one sent nothing more."""


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


class PushClient(Protocol):
    client_id: str
    stop: threading.Event

    def push(self, body: bytes, n_records: int, stats: PushStats, *, list_id: str | None = None) -> PushResult: ...

    def errors_of(self, request_ids: list[str], stats: PushStats, *, list_id: str | None = None) -> list[dict]: ...


@dataclass
class _Sent:
    batch: int
    positions: tuple[int, ...]  # the caller's positions of the records sent, in request order
    rejected: int  # as the answer counted


class Fanout:
    """One push: threads, the stop flag, what each request held, and what Ometria refused."""

    def __init__(
        self,
        client: PushClient,
        stats: PushStats,
        *,
        list_id: str | None,
        workers: int,
        progress: Callable[[PushStats], None] | None = None,
        judge_first: bool = True,
    ) -> None:
        self.client, self.stats, self.list_id, self.workers, self.progress = client, stats, list_id, workers, progress
        self.judge_first = judge_first
        self.sent: dict[str, _Sent] = {}
        self.refused: dict[tuple[int, int], Refusal] = {}
        self.looked_up: set[str] = set()
        self.batches = self.sent_records = self.answered_rejected = self.extra = 0
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ the push
    def run(self, batches: Iterable[list[dict[str, Any]]]) -> PushOutcome:
        slots = threading.BoundedSemaphore(self.workers * 2)
        pending: set[Future] = set()
        last_progress = time.monotonic()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix=f"om-{self.list_id}") as pool:
                for ordinal, batch in enumerate(batches):
                    _raise_first(pending)
                    slots.acquire()
                    pending.add(pool.submit(self._one, ordinal, batch, slots))
                    if self.judge_first and ordinal + 1 == FIRST_BATCHES:  # judged before pushing more
                        wait(pending)
                        _raise_first(pending)
                        self._judge_first()
                    if self.progress is not None and time.monotonic() - last_progress >= 10:
                        last_progress = time.monotonic()
                        self.progress(self.stats)
                wait(pending, return_when=FIRST_EXCEPTION)
                _raise_first(pending)
                wait(pending)
                _raise_first(pending)
        except BaseException:
            self.client.stop.set()
            raise
        self._look_up([rid for rid in self.sent if rid not in self.looked_up])
        self._untraced()
        refused = sorted(self.refused.values(), key=lambda r: (r.batch, r.position))
        return PushOutcome(refused=refused)

    def _one(self, ordinal: int, records: list[dict[str, Any]], slots: threading.BoundedSemaphore) -> None:
        try:
            encoded, too_large = encode_records(records)
            for position, reason in too_large:
                self._refuse(Refusal(ordinal, position, reason, by_ometria=False))
            with self.lock:
                self.batches += 1
            if encoded:
                self._send(ordinal, encoded)
        except BaseException:
            self.client.stop.set()  # at once: no other thread sends another request
            raise
        finally:
            slots.release()

    def _send(self, ordinal: int, items: list[tuple[int, bytes]]) -> None:
        body = b"[" + b",".join(raw for _, raw in items) + b"]"
        try:
            result = self.client.push(body, len(items), self.stats, list_id=self.list_id)
        except OmetriaBatchRejected as exc:
            self._isolate(ordinal, items, exc.cause)
            return
        rid = result.request_id or f"(no request_id {ordinal}:{items[0][0]})"
        with self.lock:
            self.sent[rid] = _Sent(ordinal, tuple(p for p, _ in items), result.rejected)
            self.sent_records += len(items)
            self.answered_rejected += result.rejected
            over = self.batches > FIRST_BATCHES and self.answered_rejected >= SYSTEMIC_SHARE * self.sent_records
        if over:
            self._look_up([rid])
            self._systemic(f"{self.answered_rejected} of the {self.sent_records} records pushed so far were refused")

    def _isolate(self, ordinal: int, items: list[tuple[int, bytes]], cause: str) -> None:
        """A request refused as a whole: take out the record it names, else halve it."""
        if len(items) == 1:
            self._refuse(Refusal(ordinal, items[0][0], cause))
            return
        named = _INDEX.search(cause)
        if named is not None and int(named.group(1)) < len(items):
            i = int(named.group(1))
            self._refuse(Refusal(ordinal, items[i][0], cause))
            parts = [items[:i] + items[i + 1 :]]
        else:
            half = len(items) // 2
            parts = [items[:half], items[half:]]
        for part in parts:
            with self.lock:
                self.extra += 1
                allowed = EXTRA_FLOOR + EXTRA_SHARE * self.batches
                over = self.extra > allowed
            if over:
                self._systemic(
                    f"isolating requests refused as a whole would take more than {allowed:.0f} extra requests "
                    f"(a quarter of the {self.batches} batches, plus {EXTRA_FLOOR}); Ometria said: {cause[:200]!r}"
                )
            self.stats.add(resent=1)
            self._send(ordinal, part)

    # ------------------------------------------------------------------ what Ometria refused
    def _refuse(self, refusal: Refusal) -> None:
        """A refusal known without a lookup: over the size limit here, or by a request refused as a whole."""
        with self.lock:
            self.refused.setdefault((refusal.batch, refusal.position), refusal)
            if refusal.by_ometria and refusal.request_id is None:
                self.sent_records += 1
                self.answered_rejected += 1

    def _look_up(self, request_ids: list[str]) -> None:
        """Tie each error of these requests to its record: by request_id and its place in the request."""
        if not request_ids:
            return
        wanted = set(request_ids)
        with self.lock:
            self.looked_up |= wanted
        entries = self.client.errors_of(request_ids, self.stats, list_id=self.list_id)
        late = 0
        for entry in entries:
            sent = self.sent.get(str(entry.get("request_id")))
            place = _INDEX.search(str(entry.get("error_path", "")))
            if sent is None or str(entry.get("request_id")) not in wanted or place is None:
                continue  # not ours, or not tied to a record: never attached to another one
            index = int(place.group(1))
            if index >= len(sent.positions):
                continue
            reason = f"{entry.get('error_message', '')} at {entry.get('error_path', '')}".strip()
            key = (sent.batch, sent.positions[index])
            with self.lock:
                if key not in self.refused:
                    self.refused[key] = Refusal(sent.batch, sent.positions[index], reason, str(entry["request_id"]))
                    late += 1
        answered = sum(self.sent[r].rejected for r in request_ids if r in self.sent)
        self.stats.add(failed_after_answer=max(0, late - answered))

    def _untraced(self) -> None:
        """Records of a request whose answer counted rejections its errors do not place: which ones is
        unknown, so none of that request is taken as held (each becomes a dead letter to replay)."""
        for rid, sent in self.sent.items():
            placed = {p for p in sent.positions if (sent.batch, p) in self.refused}
            if sent.rejected > len(placed):
                reason = f"Ometria rejected {sent.rejected} records of request {rid} without saying which"
                for p in sent.positions:
                    if p not in placed:
                        self._refuse(Refusal(sent.batch, p, reason, rid))

    def _judge_first(self) -> None:
        self._look_up(list(self.sent))
        with self.lock:
            refused = sum(1 for r in self.refused.values() if r.by_ometria)
            sent = self.sent_records
        if sent and refused >= SYSTEMIC_SHARE * sent:
            self._systemic(f"{refused} of the {sent} records of the first {FIRST_BATCHES} batches were refused")

    def _systemic(self, what: str) -> None:
        with self.lock:
            reasons = Counter(_reason_kind(r.reason) for r in self.refused.values() if r.by_ometria)
        said = "; ".join(f"{reason!r} ({n}x)" for reason, n in reasons.most_common(3)) or "no reason listed"
        self.client.stop.set()
        raise OmetriaSystemicRejection(
            f"{what} by Ometria: a systemic rejection (a mapping bug or a changed Ometria rule), not bad "
            f"members; the import stopped. Ometria said: {said}",
            client_id=self.client.client_id,
            list_id=self.list_id,
        )


def _reason_kind(reason: str) -> str:
    """A reason without its values (no address or name in a failure message) or record index."""
    message, _, path = reason.partition(" at ")
    return f"{message.split(':')[0].strip()} at {_INDEX.sub('', path)}" if path else message.split(":")[0].strip()


def _raise_first(futures: set[Future]) -> None:
    """Re-raise the first failure among the finished futures, preferring the cause to a `PushStopped`."""
    if not any(f.done() and f.exception() is not None for f in futures):
        futures.difference_update({f for f in futures if f.done()})
        return
    wait(futures)  # the stop flag is set: the rest end at once, and the cause is among them
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    futures.clear()
    raise next((e for e in errors if not isinstance(e, PushStopped)), errors[0])
