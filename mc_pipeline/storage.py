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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import ConfigurableResource
from pydantic import Field

from mc_pipeline.registry import parse_partition_key

RUN_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")  # \Z: `$` would let "id\n" through


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

    def known_contacts(self, partition: str) -> KnownContacts:
        return KnownContacts(self.partition_dir(partition) / "known")

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


KNOWN_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("email", pa.string())])


class KnownContacts:
    """The contact ids this pipeline has pushed for one partition (with their last email).

    Mailchimp forgets a member deleted outright; only this record tells a full refresh which
    contacts Ometria still holds for the list. Each import appends a delta file; a full refresh
    folds them into one base file. Everything streams by row group and keeps 8-byte keys, not
    strings, in memory, so a list of millions costs tens of megabytes, not gigabytes.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def files(self) -> list[Path]:
        """Newest first: the deltas by age, then the base."""
        deltas = sorted(self.folder.glob("delta-*.parquet"), key=lambda p: p.stat().st_mtime, reverse=True)
        base = self.folder / "base.parquet"
        return deltas + ([base] if base.exists() else [])

    def add(self, run_id: str, contacts: pa.Table | Path, exclude: set[str] | None = None) -> None:
        """Record the contacts of a Parquet file (streamed) or a table, but the ids in `exclude`."""
        if not RUN_ID_RE.fullmatch(run_id):
            raise ValueError("unsafe run id")
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"delta-{run_id}.parquet"
        tmp = self.folder / f".delta-{run_id}.tmp"
        batches = (
            pq.ParquetFile(contacts).iter_batches(batch_size=50_000, columns=["id", "email"])
            if isinstance(contacts, Path)
            else contacts.select(["id", "email"]).to_batches()
        )
        drop = pa.array(sorted(exclude or ()), pa.string())
        rows = 0
        with pq.ParquetWriter(tmp, KNOWN_SCHEMA) as out:
            for batch in batches:
                table = pa.Table.from_batches([batch]).cast(KNOWN_SCHEMA)
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
        table = pa.concat_tables([pq.read_table(f).cast(KNOWN_SCHEMA) for f in files])
        ids = table.column("id")
        return table.take(pc.index_in(pc.unique(ids), value_set=ids))  # each id's first, i.e. newest, row

    def reconcile(self, listed: np.ndarray, key: Callable[[pa.Array], np.ndarray]) -> pa.Table:
        """Fold every file into a new base of the contacts still `listed` (64-bit keys, from `key`)
        and return the others: contacts Mailchimp no longer has."""
        files = self.files()
        if not files:
            return KNOWN_SCHEMA.empty_table()
        # Pass 1: the keys, newest file first, and which row of each key is its newest.
        keys = np.concatenate(
            [key(b.column(0)) for f in files for b in pq.ParquetFile(f).iter_batches(batch_size=50_000, columns=["id"])]
        )
        newest = np.zeros(len(keys), dtype=bool)
        newest[np.unique(keys, return_index=True)[1]] = True
        still = np.isin(keys, listed)
        # Pass 2: stream the rows again into the new base, keeping the gone ones aside.
        gone: list[pa.Table] = []
        tmp = self.folder / ".base.parquet.tmp"
        start = 0
        with pq.ParquetWriter(tmp, KNOWN_SCHEMA) as out:
            for f in files:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=50_000, columns=["id", "email"]):
                    table = pa.Table.from_batches([batch]).cast(KNOWN_SCHEMA)
                    end = start + table.num_rows
                    first, kept = newest[start:end], still[start:end]
                    out.write_table(table.filter(pa.array(first & kept)))
                    if (first & ~kept).any():
                        gone.append(table.filter(pa.array(first & ~kept)))
                    start = end
        os.replace(tmp, self.folder / "base.parquet")
        for f in files:
            if f.name != "base.parquet":
                f.unlink()
        return pa.concat_tables(gone) if gone else KNOWN_SCHEMA.empty_table()
