"""The Ometria push fan-out: batches in, a `PushOutcome` out (`OmetriaClient.push_batches`, `.fanout`).

- A few threads push at the account's rate (the client's limiter); a bounded queue keeps memory flat.
- The first refusal that will not pass (401/403 key, 402 quota, retries exhausted, a systemic
  rejection) sets the client's stop flag: no thread sends another request, retries included.
- Ometria validates asynchronously: its answer counts what it refused at once, and a record may
  still fail later. Both kinds are listed at `GET /push/_errors`; the errors of every request are
  looked up by request_id, 50 requests per lookup, on the data API's own limiter, while later
  batches push (one lookup thread), and tied to a record by the request and the record's place in
  it, never to the newest error of another thread.
- A push comes in parts (`Fanout.push`, `close_part`: a checkpoint of the import); a part is handed
  on, in order, once all its answers and lookups are in, while the next one pushes.
- A request refused as a whole (400) is isolated: the record it names is taken out, else it is
  halved, within a budget of extra requests (a quarter of the part's, plus one halving).
- A systemic rejection (half the records of the first batches, or of all of a part so far) stops
  the import with one failure that names Ometria's reason. The first 3 batches are judged while at
  most `JUDGE_AHEAD` more push; the stop flag is set as soon as the judgement is known.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from mc_pipeline.resources.errors import OmetriaBatchRejected, OmetriaSystemicRejection, PushStopped
from mc_pipeline.resources.ometria_outcome import PushOutcome, PushResult, PushStats, Refusal
from mc_pipeline.transform import encode_records

FIRST_BATCHES = 3  # judged for a systemic rejection, at the start of a push
JUDGE_AHEAD = 4  # batches pushed past them while they are judged: about one lookup's time at 8 a second
SYSTEMIC_SHARE = 0.5  # of the records sent, refused by Ometria
EXTRA_SHARE = 0.25  # isolation requests allowed, as a share of the part's batches
EXTRA_FLOOR = 14  # plus one halving of a 100-record batch down to its one bad record
LOOKUP_CHUNK = 50  # request ids per `GET /push/_errors`
_INDEX = re.compile(r"\[(\d+)\]")


class PushClient(Protocol):
    client_id: str
    stop: threading.Event

    def push(self, body: bytes, n_records: int, stats: PushStats, *, list_id: str | None = None) -> PushResult: ...

    def errors_of(
        self, request_ids: list[str], stats: PushStats, *, list_id: str | None = None, even_stopped: bool = False
    ) -> list[dict]: ...


@dataclass
class _Sent:
    batch: int
    positions: tuple[int, ...]  # the caller's positions of the records sent, in request order
    rejected: int  # as the answer counted


@dataclass
class _Part:
    """A part of a push (a checkpoint of the import): its requests, what Ometria refused of them, and
    whether all of it is in."""

    judged: bool  # its first batches are judged (the push's first part)
    then: Callable[[PushOutcome], None] | None = None  # given when it is closed
    handed: int = 0  # batches handed to a thread: the next one's ordinal
    sent: dict[str, _Sent] = field(default_factory=dict)
    refused: dict[tuple[int, int], Refusal] = field(default_factory=dict)
    first: list[str] = field(default_factory=list)  # request ids of the first batches: the judgement's
    unlooked: list[str] = field(default_factory=list)  # answered, not yet handed to a lookup
    batches: int = 0  # started
    unanswered: int = 0  # handed to a thread, not finished
    first_done: int = 0
    looking: int = 0  # lookups handed to the lookup thread, not finished
    sent_records: int = 0
    answered_rejected: int = 0
    extra: int = 0
    closed: bool = False  # every batch handed to a thread
    tail: bool = False  # the last lookup handed on

    @property
    def done(self) -> bool:
        return self.closed and self.tail and not self.unanswered and not self.looking


class Fanout:
    """One push in parts: threads, the stop flag, what each request held, and what Ometria refused.
    A context manager: `push` hands batches on to the open part, `close_part` ends it; leaving the
    `with` waits for every part to be in."""

    def __init__(
        self,
        client: PushClient,
        stats: PushStats,
        *,
        list_id: str | None,
        workers: int,
        progress: Callable[[PushStats], None] | None = None,
    ) -> None:
        self.client, self.stats, self.list_id, self.workers, self.progress = client, stats, list_id, workers, progress
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # a task ended or the judgement came in
        self.parts: list[_Part] = []  # not yet handed on, in order
        self.failures: list[BaseException] = []
        self.in_flight = self.looking = self.opened = 0
        self.open: _Part | None = None
        self.judgement_in = False
        self.last_progress = time.monotonic()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix=f"om-{list_id}")
        self.lookups = ThreadPoolExecutor(1, thread_name_prefix=f"om-errors-{list_id}")  # the data API's rate

    def __enter__(self) -> Fanout:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        failed = kind is not None
        try:
            if not failed:
                if self.open is not None:
                    self.close_part(None)
                self._wait_for(lambda: not self.parts)
        except BaseException:
            failed = True
            raise
        finally:
            if failed:
                self.client.stop.set()  # at once: no other thread sends another request
            self.pool.shutdown(cancel_futures=True)
            self.lookups.shutdown(cancel_futures=True)

    def run(self, batches: Iterable[list[dict[str, Any]]]) -> PushOutcome:
        """The whole push as one part."""
        outcomes: list[PushOutcome] = []
        with self:
            self.push(batches)
            self.close_part(outcomes.append)
        return outcomes[0]

    # ------------------------------------------------------------------ the push
    def push(self, batches: Iterable[list[dict[str, Any]]]) -> None:
        """Push these batches in the open part (their ordinals go on from its last batch's); returns
        once the last is handed to a thread: their answers and lookups come later."""
        part = self._open()
        for batch in batches:
            ordinal = part.handed
            if part.judged and ordinal == FIRST_BATCHES + JUDGE_AHEAD:
                self._wait_for(lambda: self.judgement_in)
            self._wait_for(lambda: self.in_flight < 2 * self.workers)
            with self.lock:
                self.in_flight += 1
                part.unanswered += 1
                part.handed += 1
            self.pool.submit(self._task, False, part, self._one, part, ordinal, batch)
            if self.progress is not None and time.monotonic() - self.last_progress >= 10:
                self.last_progress = time.monotonic()
                self.progress(self.stats)
        self._wait_for(lambda: True)  # hands on the parts already in

    def close_part(self, then: Callable[[PushOutcome], None] | None) -> None:
        """End the open part: `then(outcome)` is called in this thread once all its answers and lookups
        are in (parts in order, while the next part pushes); its refusals' ordinals count from 0."""
        part = self._open()
        self.open = None
        with self.lock:
            part.then = then
            part.closed = True
            self._tail(part)
        self._wait_for(lambda: True)

    def _open(self) -> _Part:
        if self.open is None:
            self.open = _Part(judged=not self.opened)
            self.opened += 1
            with self.lock:
                self.parts.append(self.open)
        return self.open

    def _wait_for(self, ready: Callable[[], bool]) -> None:
        """Block until `ready()`; meanwhile hand on the parts that are in and raise the first failure."""
        while True:
            self._hand_on()
            with self.changed:
                if not self.failures and not (self.parts and self.parts[0].done):
                    if ready():
                        return
                    self.changed.wait()

    def _hand_on(self) -> None:
        with self.lock:
            failed = bool(self.failures)
        if failed:
            self.client.stop.set()
            with self.changed:  # the stop flag is set: the others end at once, and the cause is among them
                while self.in_flight or self.looking:
                    self.changed.wait()
                errors = list(self.failures)
            raise next((e for e in errors if not isinstance(e, PushStopped)), errors[0])
        while True:
            with self.lock:
                if not self.parts or not self.parts[0].done:
                    return
                part = self.parts.pop(0)
            self._untraced(part)
            if part.then is not None:
                part.then(PushOutcome(sorted(part.refused.values(), key=lambda r: (r.batch, r.position))))

    def _task(self, lookup: bool, part: _Part, fn: Callable[..., None], *args: Any) -> None:
        """A push or a lookup on a thread: a failure stops every push and is raised by the caller."""
        try:
            fn(*args)
        except BaseException as exc:
            self.client.stop.set()  # at once: no other thread sends another request
            with self.lock:
                self.failures.append(exc)
        finally:
            with self.changed:
                if lookup:
                    self.looking -= 1
                    part.looking -= 1
                else:
                    self.in_flight -= 1
                    part.unanswered -= 1
                    self._tail(part)
                self.changed.notify_all()

    def _look_up_later(self, part: _Part, fn: Callable[..., None], *args: Any) -> None:
        """On the lookup thread (the caller holds the lock): counted before it is handed on."""
        self.looking += 1
        part.looking += 1
        self.lookups.submit(self._task, True, part, fn, *args)

    def _tail(self, part: _Part) -> None:
        """Once every batch of the part is answered, its last requests are looked up (caller holds the lock)."""
        if part.closed and not part.unanswered and not part.tail:
            part.tail = True
            if part.first_done < FIRST_BATCHES:  # too few batches to judge: theirs are looked up here
                part.unlooked, part.first = part.first + part.unlooked, []
            if part.unlooked:
                self._look_up_later(part, self._look_up, part, part.unlooked)
                part.unlooked = []

    def _one(self, part: _Part, ordinal: int, records: list[dict[str, Any]]) -> None:
        encoded, too_large = encode_records(records)
        for position, reason in too_large:
            self._refuse(part, Refusal(ordinal, position, reason, by_ometria=False))
        with self.lock:
            part.batches += 1
        if encoded:
            self._send(part, ordinal, encoded)
        if part.judged and ordinal < FIRST_BATCHES:
            with self.lock:
                part.first_done += 1
                if part.first_done == FIRST_BATCHES:
                    self._look_up_later(part, self._judge_first, part)

    def _send(self, part: _Part, ordinal: int, items: list[tuple[int, bytes]]) -> None:
        body = b"[" + b",".join(raw for _, raw in items) + b"]"
        try:
            result = self.client.push(body, len(items), self.stats, list_id=self.list_id)
        except OmetriaBatchRejected as exc:
            self._isolate(part, ordinal, items, exc.cause)
            return
        rid = result.request_id or f"(no request_id {ordinal}:{items[0][0]})"
        with self.lock:
            part.sent[rid] = _Sent(ordinal, tuple(p for p, _ in items), result.rejected)
            part.sent_records += len(items)
            part.answered_rejected += result.rejected
            if part.judged and ordinal < FIRST_BATCHES:
                part.first.append(rid)
            else:
                part.unlooked.append(rid)
                if len(part.unlooked) >= LOOKUP_CHUNK:  # looked up while the next batches push
                    self._look_up_later(part, self._look_up, part, part.unlooked)
                    part.unlooked = []
            over = (
                (self.judgement_in or not part.judged)  # before it, the judgement of the first batches decides
                and part.batches > FIRST_BATCHES
                and part.answered_rejected >= SYSTEMIC_SHARE * part.sent_records
            )
            counts = f"{part.answered_rejected} of the {part.sent_records}"
        if over:
            self._systemic(part, f"{counts} records pushed so far were refused", [rid])

    def _isolate(self, part: _Part, ordinal: int, items: list[tuple[int, bytes]], cause: str) -> None:
        """A request refused as a whole: take out the record it names, else halve it."""
        if len(items) == 1:
            self._refuse(part, Refusal(ordinal, items[0][0], cause))
            return
        named = _INDEX.search(cause)
        if named is not None and int(named.group(1)) < len(items):
            i = int(named.group(1))
            self._refuse(part, Refusal(ordinal, items[i][0], cause))
            parts = [items[:i] + items[i + 1 :]]
        else:
            half = len(items) // 2
            parts = [items[:half], items[half:]]
        for items_part in parts:
            with self.lock:
                part.extra += 1
                allowed = EXTRA_FLOOR + EXTRA_SHARE * part.batches
                over = part.extra > allowed
                batches = part.batches
            if over:
                self._systemic(
                    part,
                    f"isolating requests refused as a whole would take more than {allowed:.0f} extra requests "
                    f"(a quarter of the {batches} batches, plus {EXTRA_FLOOR}); Ometria said: {cause[:200]!r}",
                )
            self.stats.add(resent=1)
            self._send(part, ordinal, items_part)

    # ------------------------------------------------------------------ what Ometria refused
    def _refuse(self, part: _Part, refusal: Refusal) -> None:
        """A refusal known without a lookup: over the size limit here, or by a request refused as a whole."""
        with self.lock:
            part.refused.setdefault((refusal.batch, refusal.position), refusal)
            if refusal.by_ometria and refusal.request_id is None:
                part.sent_records += 1
                part.answered_rejected += 1

    def _look_up(self, part: _Part, request_ids: list[str], even_stopped: bool = False) -> None:
        """Tie each error of these requests to its record: by request_id and its place in the request."""
        wanted = set(request_ids)
        entries = self.client.errors_of(request_ids, self.stats, list_id=self.list_id, even_stopped=even_stopped)
        late = 0
        with self.lock:
            for entry in entries:
                sent = part.sent.get(str(entry.get("request_id")))
                place = _INDEX.search(str(entry.get("error_path", "")))
                if sent is None or str(entry.get("request_id")) not in wanted or place is None:
                    continue  # not ours, or not tied to a record: never attached to another one
                index = int(place.group(1))
                if index >= len(sent.positions):
                    continue
                reason = f"{entry.get('error_message', '')} at {entry.get('error_path', '')}".strip()
                key = (sent.batch, sent.positions[index])
                if key not in part.refused:
                    part.refused[key] = Refusal(sent.batch, sent.positions[index], reason, str(entry["request_id"]))
                    late += 1
            answered = sum(part.sent[r].rejected for r in request_ids if r in part.sent)
        self.stats.add(failed_after_answer=max(0, late - answered))

    def _untraced(self, part: _Part) -> None:
        """Records of a request whose answer counted rejections its errors do not place: which ones is
        unknown, so none of that request is taken as held (each becomes a dead letter to replay)."""
        for rid, sent in part.sent.items():
            placed = {p for p in sent.positions if (sent.batch, p) in part.refused}
            if sent.rejected > len(placed):
                reason = f"Ometria rejected {sent.rejected} records of request {rid} without saying which"
                for p in sent.positions:
                    if p not in placed:
                        self._refuse(part, Refusal(sent.batch, p, reason, rid))

    def _judge_first(self, part: _Part) -> None:
        """The first batches, on the lookup thread while the next ones push: by their answers (known at
        once: the stop comes before the lookup that names the reason), then by their errors."""
        with self.lock:
            first = list(part.first)
            refused_whole = [r for r in part.refused.values() if r.by_ometria and not r.request_id]
            whole = sum(1 for r in refused_whole if r.batch < FIRST_BATCHES)
            sent = sum(len(part.sent[r].positions) for r in first) + whole
            answered = sum(part.sent[r].rejected for r in first) + whole
        what = f"records of the first {FIRST_BATCHES} batches were refused"
        if sent and answered >= SYSTEMIC_SHARE * sent:
            self._systemic(part, f"{answered} of the {sent} {what}", first)
        self._look_up(part, first)
        with self.lock:
            refused = sum(1 for r in part.refused.values() if r.by_ometria and r.batch < FIRST_BATCHES)
        if sent and refused >= SYSTEMIC_SHARE * sent:
            self._systemic(part, f"{refused} of the {sent} {what}")
        with self.changed:
            self.judgement_in = True
            self.changed.notify_all()

    def _systemic(self, part: _Part, what: str, name_from: list[str] | None = None) -> None:
        """Stop every push, look up the errors of `name_from` to name Ometria's reason, and fail."""
        self.client.stop.set()
        if name_from:
            self._look_up(part, name_from, even_stopped=True)
        with self.lock:
            reasons = Counter(_reason_kind(r.reason) for r in part.refused.values() if r.by_ometria)
        said = "; ".join(f"{reason!r} ({n}x)" for reason, n in reasons.most_common(3)) or "no reason listed"
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
