"""The sandbox's Mailchimp data: accounts, lists, members, queries and the mutations tests make.

Members are stored pre-serialised (compact JSON bytes) with their query columns in flat arrays,
so a page is a slice of a cached, ordered index plus a join of byte strings: the server spends
its CPU on the wire, not on rebuilding dictionaries.
"""

from __future__ import annotations

import contextlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from mc_pipeline.sandbox.clock import SandboxClock
from mc_pipeline.sandbox.config import Faults
from mc_pipeline.sandbox.fields import Tree, project
from mc_pipeline.sandbox.generate import STATUSES, MemberFactory, iso, member_id

STATUS_CODE = {s: i for i, s in enumerate(STATUSES)}
ARCHIVED = STATUS_CODE["archived"]
DELETED = 255  # a member deleted permanently: gone from every listing
_PROJECTIONS_KEPT = 4

if TYPE_CHECKING:
    from mc_pipeline.sandbox.member_query import MemberQuery


class MailchimpProblem(Exception):
    """An API error the server renders as application/problem+json."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail


class MailchimpList:
    """One audience. Thread-safe: the server's loop and the test's thread both touch it."""

    def __init__(
        self,
        account: SandboxMailchimpAccount,
        list_id: str,
        name: str,
        factory: MemberFactory,
        size: int,
        created: int,
        faults: Faults | None = None,
    ) -> None:
        self.account = account
        self.id = list_id
        self.name = name
        self.web_id = int(list_id[:6], 16)
        self.created = created
        self.faults = faults
        self.factory = factory
        self._lock = threading.RLock()
        self._docs: list[bytes] = []
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._by_contact: dict[str, int] = {}  # contact_id -> slot: members are looked up by either
        self._last_changed = array("q")
        self._opt = array("q")
        self._signup = array("q")
        self._status = bytearray()
        self._version = 0
        self._snapshot: tuple[int, dict[str, np.ndarray]] | None = None
        self._queries: OrderedDict[MemberQuery, np.ndarray] = OrderedDict()
        self._projections: OrderedDict[tuple[str, str], list[bytes | None]] = OrderedDict()
        for i in range(size):
            member = factory.make(i)
            self._append(member["id"], _row(member))

    # ----------------------------------------------------------------- storage
    # A change is computed whole (`_row`, which may refuse it) before anything is written; the
    # writes that follow cannot fail, so a refused change leaves the list exactly as it was.
    def _append(self, member_id_: str, row: _Row) -> int:
        slot = len(self._docs)
        self._docs.append(row.doc)
        self._ids.append(member_id_)
        self._index[member_id_] = slot
        self._by_contact[row.contact_id] = slot
        self._last_changed.append(row.last_changed)
        self._opt.append(row.opt)
        self._signup.append(row.signup)
        self._status.append(row.status)
        for cache in self._projections.values():
            cache.append(None)
        return slot

    def _store(self, slot: int, row: _Row) -> None:
        previous = orjson.loads(self._docs[slot]).get("contact_id")
        if previous != row.contact_id:  # re-added after a permanent delete: a new contact
            self._by_contact.pop(previous, None)
            self._by_contact[row.contact_id] = slot
        self._docs[slot] = row.doc
        self._last_changed[slot] = row.last_changed
        self._opt[slot] = row.opt
        self._signup[slot] = row.signup
        self._status[slot] = row.status
        for cache in self._projections.values():
            cache[slot] = None

    def _changed(self) -> None:
        self._version += 1
        self._queries.clear()

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._snapshot is None or self._snapshot[0] != self._version:
            self._snapshot = (
                self._version,
                {
                    "last_changed": np.array(self._last_changed, dtype=np.int64),
                    "timestamp_opt": np.array(self._opt, dtype=np.int64),
                    "timestamp_signup": np.array(self._signup, dtype=np.int64),
                    "status": np.frombuffer(bytes(self._status), dtype=np.uint8),
                },
            )
        return self._snapshot[1]

    # ----------------------------------------------------------------- reading
    def __len__(self) -> int:
        with self._lock:
            return int(np.count_nonzero(self._arrays()["status"] != DELETED))

    def counts(self) -> dict[str, int]:
        with self._lock:
            codes = np.bincount(self._arrays()["status"][self._arrays()["status"] != DELETED], minlength=6)
        return {s: int(codes[i]) for i, s in enumerate(STATUSES)}

    def select(self, q: MemberQuery) -> np.ndarray:
        """Slots matching `q`, in the order the API pages them (cached until the next change)."""
        with self._lock:
            hit = self._queries.get(q)
            if hit is not None:
                self._queries.move_to_end(q)
                return hit
            cols = self._arrays()
            status = cols["status"]
            if q.status is None:  # as on the real API, archived members only when asked for
                mask = (status != DELETED) & (status != ARCHIVED)
            else:
                mask = status == STATUS_CODE[q.status]
            lc = cols["last_changed"]
            if q.since_last_changed is not None:
                mask &= lc > q.since_last_changed  # excludes the exact instant
            if q.before_last_changed is not None:
                mask &= lc <= q.before_last_changed  # includes it
            if q.unsubscribed_since is not None:
                mask &= lc > q.unsubscribed_since  # an unsubscribe is its member's last change
            opt = cols["timestamp_opt"]
            if q.since_timestamp_opt is not None:
                mask &= opt > q.since_timestamp_opt
            if q.before_timestamp_opt is not None:
                mask &= (opt >= 0) & (opt <= q.before_timestamp_opt)  # never opted in: no match
            slots = np.flatnonzero(mask)
            if q.reads_documents():
                docs = self._docs
                slots = np.array([s for s in slots if q.keeps(orjson.loads(docs[s]))], dtype=np.int64)
            if q.sort_field is not None:
                keys = cols[q.sort_field][slots]
                if q.sort_dir == "DESC":
                    keys = -keys
                slots = slots[np.argsort(keys, kind="stable")]  # ties keep insertion order
            self._queries[q] = slots
            if len(self._queries) > 32:
                self._queries.popitem(last=False)
            return slots

    def latest(self, status: str, column: str) -> str:
        """The newest `column` timestamp among members of `status`, "" if none (list stats)."""
        with self._lock:
            cols = self._arrays()
            values = cols[column][cols["status"] == STATUS_CODE[status]]
            return iso(int(values.max())) if len(values) and values.max() >= 0 else ""

    def serialized(self, slots: Sequence[int] | np.ndarray, fields: Tree | None, excluded: Tree | None) -> list[bytes]:
        """Each member's JSON under a projection, cached per projection: pages of a sync reuse it."""
        with self._lock:
            if fields is None and excluded is None:
                docs = self._docs
                return [docs[s] for s in slots]
            key = (orjson.dumps(fields).decode(), orjson.dumps(excluded).decode())
            cache = self._projections.get(key)
            if cache is None:
                cache = [None] * len(self._docs)
                self._projections[key] = cache
                if len(self._projections) > _PROJECTIONS_KEPT:
                    self._projections.popitem(last=False)
            else:
                self._projections.move_to_end(key)
            out = []
            for s in slots:
                b = cache[s]
                if b is None:
                    b = _kept_json(project(orjson.loads(self._docs[s]), fields, excluded))
                    cache[s] = b
                out.append(b)
            return out

    def get(self, key: str) -> dict[str, Any]:
        """A member by subscriber hash, email address or contact_id, as the real endpoint accepts all three."""
        with self._lock:
            slot = self._slot(key)
            return orjson.loads(self._docs[slot])

    def members(self, *, include_archived: bool = True) -> list[dict[str, Any]]:
        """Every member (tests compare this with what reached Ometria)."""
        with self._lock:
            status = self._arrays()["status"]
            keep = (status != DELETED) if include_archived else ((status != DELETED) & (status != ARCHIVED))
            return [orjson.loads(self._docs[s]) for s in np.flatnonzero(keep)]

    def _slot(self, key: str) -> int:
        if len(key) == 32 and "@" not in key:
            slot = self._index.get(key, self._by_contact.get(key))
        else:
            slot = self._index.get(member_id(key))
        if slot is None or self._status[slot] == DELETED:
            raise MailchimpProblem(404, "Resource Not Found", "The requested resource could not be found.")
        return slot

    # ----------------------------------------------------------------- changes
    def add(
        self,
        email: str,
        *,
        status: str = "subscribed",
        merge_fields: dict[str, Any] | None = None,
        clock: SandboxClock,
    ) -> dict[str, Any]:
        now = clock.now_s()
        if not isinstance(email, str) or "@" not in email:
            raise MailchimpProblem(400, "Invalid Resource", f"email_address must be an email address: {email!r}.")
        _check_status(status)
        _check_merge_fields(merge_fields)
        with self._lock:
            mid = member_id(email)
            if mid in self._index and self._status[self._index[mid]] != DELETED:
                raise MailchimpProblem(400, "Member Exists", f"{email} is already a list member.")
            member = self.factory.make(len(self._docs), email=email, status=status)
            if merge_fields is not None:
                member["merge_fields"] = {**member["merge_fields"], **merge_fields}
                _sync_full_name(member)
            member["timestamp_signup"] = iso(now)
            member["timestamp_opt"] = iso(now) if status == "subscribed" else ""
            member["last_changed"] = iso(now)
            row = _row(member)
            if mid in self._index:  # re-added after a permanent delete
                self._store(self._index[mid], row)
            else:
                self._append(mid, row)
            self._changed()
            return member

    def update(
        self,
        key: str,
        *,
        clock: SandboxClock,
        status: str | None = None,
        merge_fields: dict[str, Any] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        now = clock.now_s()
        if status is not None:
            _check_status(status)
        _check_merge_fields(merge_fields)
        with self._lock:
            slot = self._slot(key)
            member = orjson.loads(self._docs[slot])  # a copy: nothing is written until `_store`
            if merge_fields:
                member["merge_fields"] = {**member["merge_fields"], **merge_fields}
                _sync_full_name(member)
            for name, value in fields.items():
                if name in ("id", "contact_id", "email_address", "list_id", "last_changed"):
                    raise ValueError(f"{name} cannot be changed through update()")
                member[name] = value
            if status is not None:
                member["status"] = status
                if status == "unsubscribed":
                    member.setdefault("unsubscribe_reason", "N/A (Unsubscribed by admin)")
                elif status == "subscribed":
                    member["timestamp_opt"] = iso(now)
                    member.pop("unsubscribe_reason", None)
            member["last_changed"] = iso(now)
            self._store(slot, _row(member))
            self._changed()
            return member

    def delete_permanently(self, key: str) -> None:
        with self._lock:
            slot = self._slot(key)
            self._status[slot] = DELETED
            for cache in self._projections.values():
                cache[slot] = None
            self._changed()


def _kept_json(value: Any) -> bytes:
    """JSON bytes to keep for the list's lifetime, copied to their exact size.

    orjson returns its (larger) output buffer shrunk in place; keeping thousands of those pins
    the rest of each buffer's heap memory. Measured on 100,000 members: 867 MiB instead of
    436 MiB after generation, and a first `fields` pass at 31 ms of server CPU per page instead
    of 10, most of it page faults from the growing heap.
    """
    return bytes(memoryview(orjson.dumps(value)))


@dataclass(frozen=True)
class _Row:
    """One member as the list stores it: its JSON and its query columns."""

    doc: bytes
    contact_id: str
    last_changed: int
    opt: int
    signup: int
    status: int


def _row(member: dict[str, Any]) -> _Row:
    """Everything a write needs, computed (and refused) before the list is touched."""
    _check_status(member.get("status"))
    return _Row(
        doc=_kept_json(member),
        contact_id=str(member.get("contact_id", "")),
        last_changed=_ts(member, "last_changed"),
        opt=_ts(member, "timestamp_opt"),
        signup=_ts(member, "timestamp_signup"),
        status=STATUS_CODE[member["status"]],
    )


def _check_status(status: object) -> None:
    if not isinstance(status, str) or status not in STATUS_CODE:
        raise MailchimpProblem(400, "Invalid Resource", f"Unknown status {status!r}; known: {list(STATUSES)}.")


def _check_merge_fields(merge_fields: object) -> None:
    if merge_fields is not None and not isinstance(merge_fields, dict):
        raise MailchimpProblem(400, "Invalid Resource", f"merge_fields must be an object, not {merge_fields!r}.")


def _ts(member: dict[str, Any], name: str) -> int:
    """A timestamp column: an ISO 8601 date-time with its UTC offset, or '' (never set)."""
    value = member.get(name, "")
    if value == "":
        return -1
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            dt = datetime.fromisoformat(value)
            if dt.tzinfo is not None:
                return int(dt.timestamp())
    detail = f"{name} must be an ISO 8601 date-time with a UTC offset: {value!r}."
    raise MailchimpProblem(400, "Invalid Resource", detail)


def _sync_full_name(member: dict[str, Any]) -> None:
    mf = member["merge_fields"]
    member["full_name"] = f"{mf.get('FNAME', '')} {mf.get('LNAME', '')}".strip()


@dataclass
class SandboxMailchimpAccount:
    """One API key's account. Requests in flight are counted here, per key."""

    client_id: str
    api_key: str
    dc: str
    lists: dict[str, MailchimpList] = field(default_factory=dict)
    revoked: bool = False

    def list(self, list_id: str) -> MailchimpList:
        try:
            return self.lists[list_id]
        except KeyError:
            raise MailchimpProblem(404, "Resource Not Found", "The requested resource could not be found.") from None

    def ordered_lists(self) -> Iterable[MailchimpList]:
        return sorted(self.lists.values(), key=lambda x: (x.created, x.id))
