"""Reconciliation with what Ometria holds: pure, column-wise (numpy, pyarrow), no files, no package imports.

Three questions, each answered here once and fed by `storage.KnownContacts` (the files) and
`assets/ometria.py` (the push):
- which records Ometria already holds byte for byte (`KnownHashes`, `Backlog`): those are not pushed;
- which known contacts Mailchimp no longer lists (`judge`): a full refresh opts them out;
- the opt-out records themselves (`tombstones`).
Contacts are 64-bit keys (`staging.id_keys`, passed in by the caller), so millions cost megabytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

NEVER = np.iinfo(np.int64).min  # a contact without `seen` (recorded before it existed): as old as can be


@dataclass(frozen=True)
class KnownHashes:
    """Sorted contact keys and the hash of the record Ometria last accepted for each (0: unknown)."""

    keys: np.ndarray
    hashes: np.ndarray

    @classmethod
    def none(cls) -> KnownHashes:
        """Nothing held: every record is pushed (`push_all`)."""
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64))

    @classmethod
    def newest(cls, keys: np.ndarray, hashes: np.ndarray) -> KnownHashes:
        """From rows newest first (the first row of a key is its newest), one hash per key."""
        unique, first = np.unique(keys, return_index=True)
        return cls(unique, hashes[first])

    def unchanged(self, keys: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Which of these records Ometria already holds byte for byte: same key, same nonzero hash."""
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        if not len(self.keys):
            return np.zeros(len(keys), dtype=bool)
        return (self.keys[at] == keys) & (self.hashes[at] == hashes) & (hashes != 0)


def listed_keys(parts: Iterable[np.ndarray]) -> np.ndarray:
    """The sorted, unique keys of every member a full fetch listed (parts: one per row group)."""
    return np.unique(np.concatenate([np.zeros(0, dtype=np.uint64), *parts]))


@dataclass(frozen=True)
class Judgement:
    """Per known-contact row (rows newest first): is it its key's newest row, is the contact kept, and
    the latest time its key was seen (seconds; `NEVER` when unknown)."""

    newest: np.ndarray
    kept: np.ndarray
    last_seen: np.ndarray


def judge(keys: np.ndarray, seen: np.ndarray, listed: np.ndarray, judged_until: datetime | None) -> Judgement:
    """Which known contacts Mailchimp no longer has: not in `listed` and seen last at or before
    `judged_until` (the full fetch's bound; None judges all). A contact seen after the bound was
    pushed by a run that started later, which the full fetch cannot have listed: it is kept."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    newest = np.zeros(len(keys), dtype=bool)
    newest[first] = True
    last_seen = np.full(len(first), NEVER, dtype=np.int64)
    np.maximum.at(last_seen, inverse, seen)
    row_seen = last_seen[inverse]
    kept = np.isin(keys, listed)
    if judged_until is not None:
        kept |= row_seen > int(judged_until.timestamp())
    return Judgement(newest, kept, row_seen)


@dataclass
class Backlog:
    """The records of a push waiting to go, and what to record as held once Ometria has answered.

    `add` sorts a batch into records to push (changed) and rows Ometria holds as they are (skipped),
    by hash alone: records are built only for the changed rows, so an unchanged row costs its hash
    and a lookup, never a record; `take` hands out whole batches of the waiting records, to push at
    once; `checkpoint` the rows to record once those handed out since the last checkpoint are
    answered: theirs and the skipped."""

    held: KnownHashes
    skipped: int = 0
    todo: list[dict[str, Any]] = field(default_factory=list)  # records to push, in order
    todo_rows: list[pa.Table] = field(default_factory=list)  # their id, email and hash
    seen_rows: list[pa.Table] = field(default_factory=list)  # skipped since the last checkpoint
    taken_rows: list[pa.Table] = field(default_factory=list)  # handed out since the last checkpoint

    def add(
        self,
        ids: pa.Array,
        emails: pa.Array,
        keys: np.ndarray,
        hashes: np.ndarray,
        records_of: Callable[[np.ndarray], list[dict[str, Any]]],
    ) -> None:
        """`records_of(changed)`: the records of the rows where the mask `changed` is true, in order."""
        same = self.held.unchanged(keys, hashes)
        rows = pa.table({"id": ids, "email": emails, "hash": pa.array(hashes)})
        self.skipped += int(same.sum())
        if not same.all():
            records = records_of(~same)
            if len(records) != int((~same).sum()):
                raise ValueError(f"{len(records)} records for {int((~same).sum())} changed rows")
            self.todo += records
        self.todo_rows.append(rows.filter(pa.array(~same)))
        self.seen_rows.append(rows.filter(pa.array(same)))

    def due(self, checkpoint: int) -> bool:
        """Time to record: `checkpoint` records were handed out since the last checkpoint, or ten times
        as many were skipped."""
        taken, seen = (sum(t.num_rows for t in rows) for rows in (self.taken_rows, self.seen_rows))
        return taken >= checkpoint or seen >= 10 * checkpoint

    def take(self, batch_size: int, final: bool) -> list[list[dict[str, Any]]]:
        """The batches to push now: whole ones only, unless `final`."""
        n = len(self.todo) if final else len(self.todo) // batch_size * batch_size
        batches = [self.todo[i : min(i + batch_size, n)] for i in range(0, n, batch_size)]
        rows = pa.concat_tables(self.todo_rows) if self.todo_rows else None
        if rows is not None and n:
            self.taken_rows.append(rows.slice(0, n))
        self.todo = self.todo[n:]
        self.todo_rows = [rows.slice(n)] if rows is not None and n < rows.num_rows else []
        return batches

    def checkpoint(self) -> pa.Table | None:
        """The rows to record once the batches handed out since the last checkpoint are answered (the
        skipped and those pushed), or None when there is nothing to record."""
        recorded = self.seen_rows + self.taken_rows
        self.seen_rows, self.taken_rows = [], []
        return pa.concat_tables(recorded) if recorded else None


def tombstones(known: pa.RecordBatch | pa.Table, collection: str, when: datetime) -> list[dict[str, Any]]:
    """Records that opt out contacts whose member Mailchimp deleted outright (`@merge` keeps the rest)."""
    stamp = when.isoformat()
    return [
        {
            "@type": "contact",
            "@collection": collection,
            "@merge": True,
            "id": row["id"],
            **({"email": row["email"]} if row["email"] else {}),
            "marketing_optin": "EXPLICITLY_OPTEDOUT",
            "@force_optin": True,  # an opt-out, forced like every other (see "Consent" in transform.py)
            "timestamp_unsubscribed": stamp,
            "properties": {"mailchimp_deleted": True},
        }
        for row in known.to_pylist()
    ]
