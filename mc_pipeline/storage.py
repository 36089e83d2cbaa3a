"""Where a partition's files live: a data root, then one folder per client list and per run.

Paths are built only from validated ids (client slug, 10-hex list id, Dagster run id), so no
value from a registry or an API can escape the data root.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import ConfigurableResource
from pydantic import Field

from mc_pipeline.registry import parse_partition_key

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


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

    @property
    def members(self) -> Path:
        return self.root / "members.parquet"

    @property
    def contacts(self) -> Path:
        return self.root / "contacts.parquet"

    @property
    def dead_letters(self) -> Path:
        return self.root / "dead_letters.parquet"


class PipelineStorage(ConfigurableResource):
    """The data root and how many run folders of each partition to keep."""

    data_dir: str | None = Field(None, description="default: MC_PIPELINE_DATA_DIR or $DAGSTER_HOME/mc_pipeline_data")
    keep_runs: int = Field(3, ge=1, description="run folders kept per partition; older ones are pruned")

    @property
    def root(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def partition_dir(self, partition: str) -> Path:
        client_id, list_id = parse_partition_key(partition)
        return self.root / "lists" / client_id / list_id

    def run_folder(self, partition: str, run_id: str) -> RunFolder:
        if not RUN_ID_RE.match(run_id):
            raise ValueError(f"run id {run_id[:80]!r} is not a safe folder name")
        folder = RunFolder(self.partition_dir(partition) / "runs" / run_id)
        folder.root.mkdir(parents=True, exist_ok=True)
        return folder

    def known_contacts(self, partition: str) -> KnownContacts:
        return KnownContacts(self.partition_dir(partition) / "known")

    def prune(self, partition: str, keep_also: tuple[str, ...] = ()) -> list[str]:
        """Remove the oldest run folders beyond `keep_runs`; never those named in `keep_also`."""
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
    contacts Ometria still holds for the list. Each import appends a small delta file; a full
    refresh folds the deltas into one base file.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def add(self, run_id: str, contacts: pa.Table) -> None:
        if not RUN_ID_RE.match(run_id):
            raise ValueError("unsafe run id")
        if contacts.num_rows:
            self.folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(contacts.select(["id", "email"]).cast(KNOWN_SCHEMA), self.folder / f"delta-{run_id}.parquet")

    def read(self) -> pa.Table:
        """Every known contact, one row per id (the latest file wins)."""
        files = sorted(self.folder.glob("*.parquet"), key=lambda p: (p.name != "base.parquet", p.stat().st_mtime))
        if not files:
            return KNOWN_SCHEMA.empty_table()
        table = pa.concat_tables([pq.read_table(f).cast(KNOWN_SCHEMA) for f in files])
        newest_first = table.take(pa.array(range(table.num_rows - 1, -1, -1)))
        ids = newest_first.column("id")
        return newest_first.take(pc.index_in(pc.unique(ids), value_set=ids))  # each id's newest row

    def replace(self, contacts: pa.Table) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".base.parquet.tmp"
        pq.write_table(contacts.select(["id", "email"]).cast(KNOWN_SCHEMA), tmp)
        os.replace(tmp, self.folder / "base.parquet")
        for delta in self.folder.glob("delta-*.parquet"):
            delta.unlink()
