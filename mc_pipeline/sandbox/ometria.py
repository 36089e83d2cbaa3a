"""The sandbox's Ometria: the push endpoint's validation, upsert store, rate and backlog limits.

Modelled on Ometria's docs (Data API introduction, Push API, "List validation errors"):
- per request: a JSON array of at most 100 records of one @type, each at most "60KB" (read
  here as 60 KiB) or the whole request is refused: 400 "Payload invalid: Record is too large.";
- the answer `{"status": "OK", "request_id", "accepted", "rejected"}` only says the request was
  received: records are validated as they are processed, and failures are listed by
  `GET /push/_errors` (the 100 most recent, `error_message` and `error_path`). The docs say the
  request_id lets one look a request up but not how; the sandbox adds `request_id` to each entry
  and answers `GET /push/_errors?request_id=..&request_id=..` with those requests' errors.
- validation that fails after the answer: `late_reject_email_pattern` (counted accepted in the
  answer, never stored, listed in the errors). Validation counted in the answer is today's
  behaviour, kept (`reject_email_pattern` and the field rules below).
Where the docs are silent (field lengths, which characters an address or a name may hold), the
rules below are the sandbox's own: no whitespace or control character in an address, no control
character in a name ("not a valid value" is the docs' example, at `root > lastname`).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from mc_pipeline.sandbox import consent
from mc_pipeline.sandbox.config import OmetriaSettings

OPTIN_VALUES = frozenset({"EXPLICITLY_OPTEDIN", "NOT_SPECIFIED", "EXPLICITLY_OPTEDOUT"})
TIMESTAMP_FIELDS = ("timestamp_acquired", "timestamp_subscribed", "timestamp_unsubscribed")
# Deliberately strict on shape, lenient on characters: one @, a dotted domain, no spaces, no
# control characters (C0, DEL, C1).
_NOT_IN_ADDRESS = r"@\s\x00-\x1f\x7f-\x9f"
_EMAIL = re.compile(rf"^[^{_NOT_IN_ADDRESS}]{{1,64}}@[^{_NOT_IN_ADDRESS}.]+(\.[^{_NOT_IN_ADDRESS}.]+)+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
REQUESTS_WITH_ERRORS_KEPT = 10_000  # for lookups by request_id; the unfiltered list keeps 100


class PushRejected(Exception):
    """A whole request refused with 400 (malformed body, too many records, mixed types, too large)."""


@dataclass
class SandboxOmetriaAccount:
    client_id: str
    api_key: str
    settings: OmetriaSettings
    # collection -> id -> the record as JSON bytes: a million stored contacts are a million objects
    # the garbage collector skips, not fifteen million it walks (its full passes stalled every
    # connection for tens of milliseconds and skewed the rate window's arrival times).
    contacts: dict[str, dict[str, bytes]] = field(default_factory=dict)
    errors: deque[dict[str, str]] = field(default_factory=lambda: deque(maxlen=100))
    errors_by_request: OrderedDict[str, list[dict[str, str]]] = field(default_factory=OrderedDict)
    writes: int = 0  # records written, counting rewrites of the same id
    events: Counter[str] = field(default_factory=Counter)  # subscription events fired (sandbox/consent.py)
    revoked: bool = False
    _arrivals: deque[float] = field(default_factory=deque)
    _backlog: float = 0.0
    _backlog_at: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ limits
    def admit(self, now: float | None = None) -> float | None:
        """Count a request against the sliding one-second window; seconds to wait if over it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            window = self._arrivals
            while window and now - window[0] >= 1.0:
                window.popleft()
            if len(window) >= self.settings.rate_per_second:
                return max(0.0, 1.0 - (now - window[0]))
            window.append(now)
            return None

    def backlog(self, now: float | None = None) -> int:
        """Records still queued for processing; the queue drains at `drain_per_second`."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._backlog = max(0.0, self._backlog - (now - self._backlog_at) * self.settings.drain_per_second)
            self._backlog_at = now
            return int(self._backlog)

    def enqueue(self, n: int) -> bool:
        """Room for `n` more records in the backlog? Takes it if so."""
        current = self.backlog()
        with self._lock:
            if current + n > self.settings.backlog_limit:
                return False
            self._backlog += n
            return True

    # ------------------------------------------------------------------ writes
    def push(self, records: list[Any], request_id: str = "") -> tuple[int, int]:
        """Validate each record and upsert the good ones. Returns (accepted, rejected) as the answer
        counts them: a record failing the late rule counts as accepted, but is not stored."""
        accepted = rejected = 0
        late = self.settings.late_reject_email_pattern
        with self._lock:
            for i, record in enumerate(records):
                problem = validate_contact(record, self.settings.reject_email_pattern)
                if problem is None and late and _email_matches(record, late):
                    accepted += 1
                    self._error(request_id, i, "Field 'email' failed validation while processing", ".email")
                    continue
                if problem is not None:
                    rejected += 1
                    self._error(request_id, i, *problem)
                    continue
                self._upsert(record)
                self.writes += 1
                accepted += 1
        return accepted, rejected

    def _upsert(self, record: dict[str, Any]) -> None:
        """Store one valid record (replaced, or merged with `@merge`); its opt-in goes through the
        subscription hierarchy (sandbox/consent.py), so the stored `marketing_optin` is the contact's."""
        store = self.contacts.setdefault(record.get("@collection", "default"), {})
        clean = {k: v for k, v in record.items() if k not in ("@merge", "@force_optin")}
        stored = store.get(record["id"])
        previous = orjson.loads(stored) if stored is not None else None
        state = previous.pop(consent.KEY, None) if previous is not None else None
        merge = bool(record.get("@merge"))
        if merge and previous is not None:
            merged = {**previous, **clean}
            if isinstance(previous.get("properties"), dict) and isinstance(clean.get("properties"), dict):
                merged["properties"] = {**previous["properties"], **clean["properties"]}
            clean = merged
        optin = record.get("marketing_optin", consent.listing(state, consent.API) if merge else None)
        state, events = consent.apply_listing(
            state,
            consent.API,
            optin,
            forced=record.get("@force_optin") is True,
            timestamp_subscribed="timestamp_subscribed" in record,
        )
        self._store(store, record["id"], clean, state, events)

    def _store(
        self, store: dict[str, bytes], rid: str, record: dict[str, Any], state: dict[str, Any], events: list[str]
    ) -> None:
        effective = consent.status(state)
        if effective is None:
            record.pop("marketing_optin", None)
        else:
            record["marketing_optin"] = effective
        store[rid] = orjson.dumps({**record, consent.KEY: state})
        self.events.update(events)

    def unsubscribe(self, collection: str, rid: str, when: str, forced: bool = False) -> dict[str, Any]:
        """An opt-out made in Ometria itself (its unsubscribe link; `forced`: its preference centre,
        whose listings carry @force_optin). Returns the contact as stored."""
        with self._lock:
            store = self.contacts.get(collection, {})
            if rid not in store:
                raise KeyError(f"no contact {rid!r} in collection {collection!r}")
            record = orjson.loads(store[rid])
            state, events = consent.apply_listing(
                record.pop(consent.KEY, None),
                consent.OMETRIA,
                consent.OPTED_OUT,
                forced=forced,
                timestamp_subscribed=False,
            )
            if consent.status(state) == consent.OPTED_OUT:
                record["timestamp_unsubscribed"] = when
            self._store(store, rid, record, state, events)
            return {**record, "subscription": _subscription(state)}

    def subscription(self, collection: str, rid: str) -> dict[str, Any]:
        """How the contact's `marketing_optin` came to be: its listings, the forced status, the events fired."""
        with self._lock:
            raw = self.contacts.get(collection, {}).get(rid)
        if raw is None:
            raise KeyError(f"no contact {rid!r} in collection {collection!r}")
        return _subscription(orjson.loads(raw).get(consent.KEY))

    def _error(self, request_id: str, index: int, message: str, path: str) -> None:
        entry = {"error_message": message, "error_path": f"[{index}]{path}", "request_id": request_id}
        self.errors.append(entry)
        self.errors_by_request.setdefault(request_id, []).append(entry)
        while len(self.errors_by_request) > REQUESTS_WITH_ERRORS_KEPT:
            self.errors_by_request.popitem(last=False)

    def errors_of(self, request_ids: list[str] | None) -> list[dict[str, str]]:
        """The 100 most recent errors, or every error of the given requests."""
        with self._lock:
            if request_ids is None:
                return list(self.errors)
            return [e for rid in request_ids for e in self.errors_by_request.get(rid, ())]

    def snapshot(self, collection: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        with self._lock:
            names = [collection] if collection is not None else list(self.contacts)
            copies = {c: dict(self.contacts.get(c, {})) for c in names}
        return {c: {rid: _public(raw) for rid, raw in recs.items()} for c, recs in copies.items()}

    def reset(self) -> None:
        with self._lock:
            self.contacts.clear()
            self.events.clear()
            self.errors.clear()
            self.errors_by_request.clear()
            self.writes = 0
            self._arrivals.clear()
            self._backlog = 0.0


def _public(raw: bytes) -> dict[str, Any]:
    """A stored record as Ometria shows it: without the sandbox's subscription bookkeeping."""
    record = orjson.loads(raw)
    record.pop(consent.KEY, None)
    return record


def _subscription(state: dict[str, Any] | None) -> dict[str, Any]:
    state = state or {}
    return {
        "marketing_optin": consent.status(state),
        "forced": state.get("forced"),
        "listings": state.get("listings", {}),
        "events": state.get("fired", []),
    }


def check_batch(body: Any, settings: OmetriaSettings, raw_records: list[bytes] | None = None) -> list[Any]:
    """Request-level rules: a JSON array of 1..100 records of one @type, each under the size limit."""
    if not isinstance(body, list):
        raise PushRejected("Payload invalid: the body must be a JSON array of records.")
    if not body:
        raise PushRejected("Payload invalid: the array holds no records.")
    if len(body) > settings.max_records:
        raise PushRejected(f"Payload invalid: {len(body)} records in one request; the limit is {settings.max_records}.")
    types = {r.get("@type") if isinstance(r, dict) else None for r in body}
    if len(types) > 1:
        raise PushRejected(f"Payload invalid: records of mixed @type {sorted(map(str, types))}; send one type.")
    if raw_records is not None:
        for i, raw in enumerate(raw_records):
            if len(raw) > settings.max_record_bytes:
                raise PushRejected(f"Payload invalid: Record is too large. (record [{i}], {len(raw)} bytes)")
    return body


def _email_matches(record: Any, pattern: str) -> bool:
    email = record.get("email") if isinstance(record, dict) else None
    return isinstance(email, str) and re.search(pattern, email) is not None


def validate_contact(record: Any, reject_email_pattern: str | None = None) -> tuple[str, str] | None:
    """(message, path) for the first problem of a contact record, None if it is valid."""
    if reject_email_pattern and _email_matches(record, reject_email_pattern):
        return f"Field 'email' is refused by this account's rules: {record['email'][:80]!r}", ".email"
    if not isinstance(record, dict):
        return "Record must be an object", ""
    if record.get("@type") != "contact":
        return f"Unsupported @type {record.get('@type')!r}; expected 'contact'", ".@type"
    rid = record.get("id")
    if not isinstance(rid, str) or not rid.strip():
        return "Field 'id' is required and must be a non-empty string", ".id"
    collection = record.get("@collection", "default")
    if not isinstance(collection, str) or not collection:
        return "Field '@collection' must be a non-empty string", ".@collection"
    email = record.get("email")
    if email is not None and (not isinstance(email, str) or not _EMAIL.match(email)):
        return f"Field 'email' is not a valid email address: {str(email)[:80]!r}", ".email"
    if email is None and record.get("customer_id") is None:
        return "A contact needs an 'email' or a 'customer_id'", ".email"
    optin = record.get("marketing_optin")
    if optin is not None and optin not in OPTIN_VALUES:
        return f"Field 'marketing_optin' must be one of {sorted(OPTIN_VALUES)}, not {optin!r}", ".marketing_optin"
    for name in TIMESTAMP_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not _is_iso8601(value):
            return f"Field '{name}' must be an ISO 8601 timestamp, not {str(value)[:40]!r}", f".{name}"
    dob = record.get("date_of_birth")
    if dob is not None and (not isinstance(dob, str) or not _is_date(dob)):
        return f"Field 'date_of_birth' must be YYYY-MM-DD, not {str(dob)[:40]!r}", ".date_of_birth"
    props = record.get("properties")
    if props is not None and not isinstance(props, dict):
        return "Field 'properties' must be an object", ".properties"
    for name in ("firstname", "lastname", "phone_number", "country_id", "customer_id"):
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            return f"Field '{name}' must be a string", f".{name}"
    for name in ("firstname", "lastname"):
        if _CONTROL.search(record.get(name) or ""):
            return f"Field '{name}' is not a valid value (control character)", f".{name}"
    return None


def _is_iso8601(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return "T" in value


def _is_date(value: str) -> bool:
    try:
        datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        return False
    return True
