"""Where a partition's files live: a data root, then one folder per client list and per run.

Paths are built only from validated ids (client slug, 10-hex list id, Dagster run id), so no
value from a registry or an API can escape the data root.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import ConfigurableResource
from pydantic import Field

from mc_pipeline.reconcile import NEVER, KnownHashes, judge
from mc_pipeline.registry import parse_partition_key
from mc_pipeline.transform import RECORD_HASH_VERSION

RUN_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")  # \Z: `$` would let "id\n" through
DESTINATION_RE = re.compile(r"[0-9a-f]{16}")


def default_data_dir() -> Path:
    """MC_PIPELINE_DATA_DIR, else $DAGSTER_HOME/mc_pipeline_data, else ./.mc_pipeline_data."""
    explicit = os.environ.get("MC_PIPELINE_DATA_DIR")
    if explicit:
        return Path(explicit)
    home = os.environ.get("DAGSTER_HOME")
    if home:
        return Path(home) / "mc_pipeline_data"
    return Path.cwd() / ".mc_pipeline_data"


@dataclass(frozen=True)
class RunFolder:
    """The files of one run of one partition."""

    root: Path

    @property
    def pages(self) -> Path:
        return self.root / "pages"

    def page(self, kind: str, pass_no: int, offset: int) -> Path:
        """`kind` is "members" or "archived"; a window paged twice keeps both passes' pages."""
        return self.pages / f"{kind}-p{pass_no}-{offset:09d}.json.gz"

    def write_page(self, kind: str, pass_no: int, offset: int, raw: bytes) -> None:
        """A page as received, gzipped (level 1: the fetching threads do this), whole or not at all
        (a temporary file per thread, then a rename). The `PageWriter` of `MailchimpClient.fetch`."""
        path = self.page(kind, pass_no, offset)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(gzip.compress(raw, compresslevel=1))
        os.replace(tmp, path)

    @property
    def members(self) -> Path:
        return self.root / "members.parquet"

    @property
    def contacts(self) -> Path:
        return self.root / "contacts.parquet"

    @property
    def listed(self) -> Path:
        """On a full refresh: the sorted 64-bit keys of every member Mailchimp listed (`save_keys`)."""
        return self.root / "listed.npy"

    @property
    def after_bound(self) -> Path:
        """On a full refresh: the sorted keys of the members listed as changed after the fetch's bound
        (`member_pages`): on no page, yet in Mailchimp, so listed (never judged deleted), not staged."""
        return self.root / "listed_after_bound.npy"

    def after_bound_keys(self) -> np.ndarray:
        """Those keys; none in a run folder from before they were written."""
        return load_keys(self.after_bound) if self.after_bound.exists() else np.zeros(0, dtype=np.uint64)


def save_keys(path: Path, keys: np.ndarray) -> None:
    """64-bit keys as a .npy file, whole or not at all: 8 bytes a member."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, np.asarray(keys, dtype=np.uint64), allow_pickle=False)
    os.replace(tmp, path)


def load_keys(path: Path) -> np.ndarray:
    return np.asarray(np.load(path, allow_pickle=False), dtype=np.uint64)


class PipelineStorage(ConfigurableResource):
    """The data root and how many run folders of each partition to keep."""

    data_dir: str | None = Field(
        default=None, description="default: MC_PIPELINE_DATA_DIR or $DAGSTER_HOME/mc_pipeline_data"
    )
    keep_runs: int = Field(default=3, ge=1, description="run folders kept per partition; older ones are pruned")

    @property
    def root(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def partition_dir(self, partition: str) -> Path:
        client_id, list_id = parse_partition_key(partition)
        return self.root / "lists" / client_id / list_id

    def run_folder(self, partition: str, run_id: str) -> RunFolder:
        if not RUN_ID_RE.fullmatch(run_id):
            raise ValueError(f"run id {run_id[:80]!r} is not a safe folder name")
        folder = RunFolder(self.partition_dir(partition) / "runs" / run_id)
        folder.root.mkdir(parents=True, exist_ok=True)
        return folder

    def known_contacts(self, partition: str, destination: str | None = None) -> KnownContacts:
        """The contacts pushed for a partition to one destination (`Destination.id`): contacts of
        another collection, account or URL were never pushed where the next tombstones go.
        Naming a destination makes it the partition's current one; without one, the current one
        (what the last sync used: for the dead letters' share and replay). The files of before
        destinations (directly under known/) go to the first destination named."""
        known = self.partition_dir(partition) / "known"
        pointer = known / "current"
        if destination is None:
            current = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
            return KnownContacts(known / current if DESTINATION_RE.fullmatch(current) else known)
        if not DESTINATION_RE.fullmatch(destination):
            raise ValueError(f"destination id {destination[:40]!r} is not a safe folder name")
        folder = known / destination
        legacy = list(known.glob("*.parquet")) if known.is_dir() else []
        if legacy and not folder.exists():
            folder.mkdir(parents=True)
            for f in legacy:
                os.replace(f, folder / f.name)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = known / f".current.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(destination, encoding="utf-8")
        os.replace(tmp, pointer)
        return KnownContacts(folder)

    def prune(self, partition: str, keep_also: tuple[str, ...] = ()) -> list[str]:
        """Remove the oldest run folders beyond `keep_runs`; never those named in `keep_also`.

        Only `runs/` is pruned: the list's outstanding dead letters (`dead_letters/`, see
        mc_pipeline.dead_letters) and its known contacts live beside it and outlive every run."""
        runs_dir = self.partition_dir(partition) / "runs"
        if not runs_dir.is_dir():
            return []
        folders = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        removed = []
        for old in folders[self.keep_runs :]:
            if old.name in keep_also:
                continue
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old.name)
        return removed


KNOWN_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("email", pa.string()),
        pa.field("seen", pa.timestamp("s", tz="UTC")),
        pa.field("hash", pa.uint64()),  # of the record Ometria last accepted (transform.record_hashes); null: unknown
        # what computed `hash` (transform.RECORD_HASH_VERSION); null (files written before it) or another: unknown
        pa.field("hash_version", pa.uint8()),
    ]
)


class KnownContacts:
    """The contact ids this pipeline has pushed for one partition and destination (with their
    last email, `seen`: the upper bound of the window of the run that pushed or confirmed them, and
    `hash`: of the record Ometria last accepted, so an unchanged record is not pushed again, with the
    `hash_version` that computed it: a hash of another version, or of none, reads as unknown, so
    after a change of the hash each record is pushed once, never skipped on a stale comparison).

    Mailchimp forgets a member deleted outright; only this record tells a full refresh which
    contacts Ometria still holds for the list. Each import appends a delta file; a full refresh
    folds them into one base file. A full fetch lists only members last changed up to its window's
    upper bound, so only contacts seen up to that bound can be judged: one pushed by a run that
    started later (beside it, or after it) is never taken for deleted (the judging itself is
    `reconcile.judge`; this class only reads and writes the files). Everything streams by row
    group and keeps 8-byte keys, not strings, in memory, so a list of millions costs tens of
    megabytes, not gigabytes.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def files(self) -> list[Path]:
        """Newest first: the deltas by age, then the base."""
        deltas = sorted(self.folder.glob("delta-*.parquet"), key=lambda p: p.stat().st_mtime, reverse=True)
        base = self.folder / "base.parquet"
        return deltas + ([base] if base.exists() else [])

    def add(
        self,
        run_id: str,
        contacts: pa.Table | Path,
        exclude: set[str] | None = None,
        seen: datetime | None = None,
        part: int | None = None,
    ) -> None:
        """Record the contacts of a Parquet file (streamed) or a table (with their `hash` when it has
        one, of today's `RECORD_HASH_VERSION`), but the ids in `exclude`, as seen at `seen` (default:
        now). `part` numbers the files of a run that records what Ometria accepted as it goes (one
        per checkpoint)."""
        if not RUN_ID_RE.fullmatch(run_id):
            raise ValueError("unsafe run id")
        self.folder.mkdir(parents=True, exist_ok=True)
        name = run_id if part is None else f"{run_id}-{part:05d}"
        target = self.folder / f"delta-{name}.parquet"
        tmp = self.folder / f".delta-{name}.tmp"
        batches = (
            pq.ParquetFile(contacts).iter_batches(batch_size=50_000, columns=["id", "email"])
            if isinstance(contacts, Path)
            else contacts.select([c for c in ("id", "email", "hash") if c in contacts.column_names]).to_batches()
        )
        stamp = pa.scalar(seen or datetime.now(UTC), KNOWN_SCHEMA.field("seen").type)
        drop = pa.array(sorted(exclude or ()), pa.string())
        rows = 0
        with pq.ParquetWriter(tmp, KNOWN_SCHEMA) as out:
            for batch in batches:
                table = pa.Table.from_batches([batch])
                table = table.append_column("seen", pa.array([stamp] * table.num_rows, stamp.type))
                if "hash" in table.column_names:
                    version = pa.scalar(RECORD_HASH_VERSION, pa.uint8())
                    table = table.append_column("hash_version", _where_valid(table.column("hash"), version))
                table = _known(table)
                if len(drop):
                    table = table.filter(pc.invert(pc.is_in(table.column("id"), value_set=drop)))
                out.write_table(table)
                rows += table.num_rows
        if rows:
            os.replace(tmp, target)
        else:
            tmp.unlink()

    def read(self) -> pa.Table:
        """Every known contact, one row per id (the newest wins). For tests and small lists."""
        files = self.files()
        if not files:
            return KNOWN_SCHEMA.empty_table()
        table = pa.concat_tables([_known(pq.read_table(f)) for f in files])
        ids = table.column("id")
        return table.take(pc.index_in(pc.unique(ids), value_set=ids))  # each id's first, i.e. newest, row

    def hashes(self, key: Callable[[pa.Array], np.ndarray]) -> KnownHashes:
        """Each known contact's newest hash, by 64-bit key (`key`), streamed: 16 bytes a contact. A
        hash of another `hash_version` than today's is 0 (unknown): its record is pushed, once."""
        keys_l, hashes_l = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
        for f in self.files():  # newest first
            for b in _batches(f, ["id", "hash", "hash_version"]):
                keys_l.append(key(b.column("id")))
                current = pc.fill_null(pc.equal(b.column("hash_version"), RECORD_HASH_VERSION), False)
                hashes = pc.if_else(current, pc.fill_null(b.column("hash"), 0), pa.scalar(0, pa.uint64()))
                hashes_l.append(np.asarray(hashes.to_numpy(zero_copy_only=False), dtype=np.uint64))
        return KnownHashes.newest(np.concatenate(keys_l), np.concatenate(hashes_l))

    def reconcile(
        self, listed: np.ndarray, key: Callable[[pa.Array], np.ndarray], judged_until: datetime | None = None
    ) -> pa.Table:
        """Fold every file into a new base and return the contacts Mailchimp no longer has: not in
        `listed` (64-bit keys, from `key`) and seen last at or before `judged_until` (the full
        fetch's bound; None judges all). The others stay, with the latest time each was seen."""
        files = self.files()
        if not files:
            return KNOWN_SCHEMA.empty_table()
        # Pass 1: the keys and times seen, newest file first; which row of each key is its newest.
        keys_l, seen_l = [], []
        for f in files:
            for b in _batches(f):
                keys_l.append(key(b.column("id")))
                seen_l.append(_seconds(b.column("seen")))
        judged = judge(np.concatenate(keys_l), np.concatenate(seen_l), listed, judged_until)
        # Pass 2: stream the rows again into the new base, keeping the gone ones aside.
        gone: list[pa.Table] = []
        tmp = self.folder / ".base.parquet.tmp"
        start = 0
        with pq.ParquetWriter(tmp, KNOWN_SCHEMA) as out:
            for f in files:
                for batch in _batches(f):
                    end = start + batch.num_rows
                    stamps = judged.last_seen[start:end]
                    stamp = pa.array(stamps, pa.int64(), mask=stamps == NEVER).cast(KNOWN_SCHEMA.field("seen").type)
                    table = pa.Table.from_batches([batch]).set_column(2, "seen", stamp)
                    first_row, kept = judged.newest[start:end], judged.kept[start:end]
                    out.write_table(table.filter(pa.array(first_row & kept)))
                    if (first_row & ~kept).any():
                        gone.append(table.filter(pa.array(first_row & ~kept)))
                    start = end
        os.replace(tmp, self.folder / "base.parquet")
        for f in files:
            if f.name != "base.parquet":
                f.unlink()
        return pa.concat_tables(gone) if gone else KNOWN_SCHEMA.empty_table()


def _known(table: pa.Table, names: list[str] | None = None) -> pa.Table:
    """A known-contacts table in today's schema (or its columns `names`); files from before `seen`,
    `hash` or `hash_version` get them empty."""
    schema = pa.schema([KNOWN_SCHEMA.field(n) for n in names]) if names else KNOWN_SCHEMA
    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(schema.names).cast(schema)


def _where_valid(column: pa.ChunkedArray, value: pa.Scalar) -> pa.ChunkedArray:
    """`value` where `column` is not null, else null."""
    return pc.if_else(pc.is_valid(column), value, pa.scalar(None, value.type))


def _batches(path: Path, names: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    source = pq.ParquetFile(path)
    columns = [c for c in (names or KNOWN_SCHEMA.names) if c in source.schema_arrow.names]
    for batch in source.iter_batches(batch_size=50_000, columns=columns):
        yield from _known(pa.Table.from_batches([batch]), names).to_batches()


def _seconds(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    as_int = pc.cast(column, pa.timestamp("s", tz="UTC")).cast(pa.int64())
    return np.asarray(pc.fill_null(as_int, NEVER).to_numpy(zero_copy_only=False), dtype=np.int64)
