"""Dead letters: members that could not be imported, with their reason. Their one home.

A dead letter keeps what is needed to try again, whole (never cut): the raw member (staging),
the staged row (transform) or the Ometria record (import). Each run writes its own to its run
folder; the list's **outstanding** store, beside the run folders so pruning never loses one,
carries them across runs until a later import of the member, a full refresh that no longer
lists it, or a replay gets it through. A dead letter never holds the watermark back (its window
would be fetched again forever); the check `dead_letters_within_share` alerts when a list's
outstanding ones pass a share of the list, reading the counts `ometria/contacts` records.
Replaying runs the current parser, mapping, validation and push; a dry run all but the push.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import MetadataValue

from mc_pipeline.staging import STAGING_SCHEMA, id_keys, parse_page
from mc_pipeline.storage import PipelineStorage
from mc_pipeline.transform import MAX_RECORD_BYTES, record_dicts, to_contacts

if TYPE_CHECKING:
    from mc_pipeline.assets.models import RunFiles

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string()),  # "staging", "transform" or "import"
        pa.field("member_id", pa.string()),
        pa.field("record_id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("payload", pa.string()),  # the member, staged row or record as JSON, whole
    ]
)
OUTSTANDING_SCHEMA = pa.schema([*DEAD_LETTER_SCHEMA, pa.field("run_id", pa.string()), pa.field("key", pa.string())])
CHECK_NAME = "dead_letters_within_share"
OUTSTANDING = "outstanding_dead_letters"  # the metadata key the check reads
NAMED = 20  # dead letters named in metadata and alerts
_EMAIL_IN_TEXT = r"[^\s'\"<>]+@[^\s'\"<>]+"
_EMAIL_IN_JSON = re.compile(rb'"email(?:_address)?":"((?:[^"\\]|\\.)*)"')


def dead_letter(stage: str, member_id: str | None, record_id: str | None, reason: str, payload: Any) -> dict[str, Any]:
    """One dead letter row; the payload as JSON, whole."""
    try:
        text = orjson.dumps(payload, default=str).decode()
    except TypeError:
        text = repr(payload)
    return {"stage": stage, "member_id": member_id, "record_id": record_id, "reason": reason, "payload": text}


def as_table(rows: list[dict[str, Any]] | pa.Table) -> pa.Table:
    """Rows (from staging, transform or the push) in the dead-letter schema. An address quoted in a
    reason (Ometria's messages quote them) becomes <email>, so reasons group and none shows."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=DEAD_LETTER_SCHEMA)
    table = table.select(DEAD_LETTER_SCHEMA.names).cast(DEAD_LETTER_SCHEMA)
    reasons = pc.replace_substring_regex(table.column("reason"), _EMAIL_IN_TEXT, "<email>")
    return table.set_column(3, "reason", reasons)


def write_run_file(run_folder: Path, stage: str, rows: list[dict[str, Any]] | pa.Table) -> int:
    """The run's dead letters of one stage, in its folder; nothing is written when there are none."""
    table = as_table(rows)
    if table.num_rows:
        pq.write_table(table, run_folder / f"dead_letters-{stage}.parquet", compression="zstd")
    return table.num_rows


def run_files(run_folder: Path) -> list[Path]:
    return sorted(run_folder.glob("dead_letters-*.parquet"))


def read_run(run_folder: Path) -> pa.Table:
    files = run_files(run_folder)
    return pa.concat_tables([as_table(pq.read_table(f)) for f in files]) if files else DEAD_LETTER_SCHEMA.empty_table()


class Outstanding:
    """A list's dead letters not yet through, across runs: one Parquet file, replaced atomically."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "outstanding.parquet"

    def read(self) -> pa.Table:
        exists = self.path.exists()
        return pq.read_table(self.path).cast(OUTSTANDING_SCHEMA) if exists else OUTSTANDING_SCHEMA.empty_table()

    def write(self, table: pa.Table) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        pq.write_table(table.cast(OUTSTANDING_SCHEMA), tmp, compression="zstd")
        os.replace(tmp, self.path)

    def record(self, run_id: str, new: pa.Table, imported: pa.Table | None, full_refresh: bool) -> pa.Table:
        """Fold in a run: its dead letters replace earlier ones of the same member; a member the run
        imported (`imported`: its contacts' `member_id` and `id`) is through. A full refresh saw
        every member, so what it did not dead-letter again is through or gone from Mailchimp."""
        old = self.read()
        fresh = _keyed(as_table(new), run_id)
        if not full_refresh and old.num_rows:
            seen = pa.concat_tables([fresh.select(["member_id", "record_id"]), *_renamed(imported)])
            again = pc.or_(
                pc.or_(
                    pc.is_in(old.column("member_id"), value_set=seen.column("member_id").drop_null()),
                    pc.is_in(old.column("record_id"), value_set=seen.column("record_id").drop_null()),
                ),
                pc.is_in(old.column("key"), value_set=fresh.column("key").combine_chunks()),
            )
            kept = old.filter(pc.invert(again))
        else:
            kept = OUTSTANDING_SCHEMA.empty_table()
        table = pa.concat_tables([kept, fresh])
        if table.num_rows or old.num_rows:
            self.write(table)
        return table


def _renamed(imported: pa.Table | None) -> list[pa.Table]:
    if imported is None:
        return []
    return [imported.rename_columns(["member_id", "record_id"]).cast(pa.schema(list(DEAD_LETTER_SCHEMA)[1:3]))]


def outstanding(storage: PipelineStorage, partition: str) -> Outstanding:
    """The store lives beside `runs/`, not in it: `PipelineStorage.prune` never reaches it."""
    return Outstanding(storage.partition_dir(partition) / "dead_letters")


def _keyed(table: pa.Table, run_id: str) -> pa.Table:
    """What identifies a dead letter across runs: its member, else its record, else its payload."""
    payload_keys = pa.array(
        [f"payload:{hashlib.sha1(p.encode()).hexdigest()}" for p in table.column("payload").to_pylist()], pa.string()
    )
    key = pc.coalesce(
        pc.binary_join_element_wise("member:", table.column("member_id"), ""),
        pc.binary_join_element_wise("record:", table.column("record_id"), ""),
        payload_keys,
    )
    return table.append_column("run_id", pa.array([run_id] * table.num_rows, pa.string())).append_column("key", key)


def list_members(storage: PipelineStorage, partition: str, pending: pa.Table) -> int:
    """The list's contacts as this pipeline knows them (those Ometria holds, and the dead letters of
    members it never took): the share's denominator. Read only when something is outstanding."""
    known = storage.known_contacts(partition).files()
    keys = [
        id_keys(b.column(0)) for f in known for b in pq.ParquetFile(f).iter_batches(batch_size=50_000, columns=["id"])
    ]
    ids = pending.column("record_id").drop_null()
    keys.append(id_keys(ids.combine_chunks()) if len(ids) else np.zeros(0, np.uint64))
    return len(np.unique(np.concatenate(keys))) + pending.column("record_id").null_count


@dataclass
class ListState:
    """A list's outstanding dead letters as the check judges them."""

    outstanding: int
    members: int
    limit: float
    named: list[dict[str, Any]] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.outstanding / self.members if self.members else float(self.outstanding > 0)

    @property
    def passed(self) -> bool:
        return self.share <= self.limit

    def metadata(self) -> dict[str, Any]:
        """Plain values: `ometria/contacts` records them and the check reads them back from Dagster."""
        return {
            OUTSTANDING: self.outstanding,
            "outstanding_share": round(self.share, 6),
            "list_members": self.members,
            "dead_letter_share_limit": self.limit,
            "outstanding_named": MetadataValue.md(_table(self.named) if self.named else "_none_"),
            "dead_letter_alert": self.describe() or "",
        }

    def describe(self) -> str | None:
        if self.passed:
            return None
        names = "; ".join(f"{_email(r)} ({r['reason']})" for r in self.named[:10])
        more = f"; and {self.outstanding - 10} more" if self.outstanding > 10 else ""
        return (
            f"{self.outstanding} outstanding dead letters, {self.share:.1%} of the list's {self.members} members "
            f"(above the {self.limit:.1%} allowed): {names}{more}. After a fix: `mc-pipeline dead-letters replay`"
        )


def settle_run(storage: PipelineStorage, run: RunFiles, contacts: Path, limit: float) -> tuple[int, ListState, dict]:
    """Fold a successful import's dead letters into the list's store: (the run's count, the list's
    state, the run's metadata). The contacts file is read only when something was outstanding."""
    folder, full = Path(run.folder), run.window.full_refresh
    dead = read_run(folder)
    store = outstanding(storage, run.partition)
    had = store.path.exists()
    imported = pq.read_table(contacts, columns=["member_id", "id"]) if had and not full else None
    pending = (
        store.record(run.run_id, dead, imported, full) if dead.num_rows or had else OUTSTANDING_SCHEMA.empty_table()
    )
    return dead.num_rows, state_of(pending, storage, run.partition, limit), run_metadata(folder, dead)


def state_of(pending: pa.Table, storage: PipelineStorage, partition: str, limit: float) -> ListState:
    members = list_members(storage, partition, pending) if pending.num_rows else 0
    return ListState(pending.num_rows, members, limit, pending.slice(0, NAMED).to_pylist())


def run_metadata(run_folder: Path, table: pa.Table) -> dict[str, Any]:
    """Counts by stage and reason, and a masked preview, of a run's dead letters."""
    if not table.num_rows:
        return {}
    return {
        "dead_letter_reasons": MetadataValue.json(dict(_reasons(table.to_pylist()).most_common())),
        "dead_letter_preview": MetadataValue.md(_table(table.slice(0, 5).to_pylist())),
        "dead_letter_files": MetadataValue.json([str(f) for f in run_files(run_folder)]),
    }


def _reasons(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(f"{r['stage']}: {r['reason']}" for r in rows)


def _table(rows: list[dict[str, Any]]) -> str:
    """Markdown: the whole reason (never cut mid-sentence), the email masked."""
    lines = ["| stage | email | member | record | reason |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r["stage"], _email(r), r["member_id"], r["record_id"], r["reason"]]
        lines.append("| " + " | ".join(str(c or "").replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def _email(row: dict[str, Any]) -> str:
    """The masked address of a dead letter's payload, whatever its shape (or none)."""
    from mc_pipeline.assets.metadata import mask

    raw = (row.get("payload") or "").encode()
    try:
        doc = orjson.loads(raw)
        email = (doc.get("email") or doc.get("email_address")) if isinstance(doc, dict) else None
    except orjson.JSONDecodeError:  # a payload written by an older version, cut at 4 KB
        found = _EMAIL_IN_JSON.search(raw)
        email = found.group(1).decode(errors="replace") if found else None
    return mask(email) if email else "-"


def describe(rows: list[dict[str, Any]], limit: int = 20) -> str:
    if not rows:
        return "no dead letters"
    lines = [f"{len(rows)} dead letters"] + [f"  {n:>6}  {reason}" for reason, n in _reasons(rows).most_common()]
    lines.append("first ones:" if len(rows) > limit else "each:")
    for r in rows[:limit]:
        lines.append(
            f"  {r['stage']:<9} member {r['member_id'] or '-':<32} record {r['record_id'] or '-':<32} "
            f"{_email(r)}  {r['reason']}"
        )
    return "\n".join(lines)


@dataclass
class ReplayPlan:
    """What a replay will push, and what fails before the push (conversion or validation)."""

    tried: int
    records: list[dict[str, Any]]
    failing: list[dict[str, Any]]


@dataclass
class ReplayResult:
    plan: ReplayPlan
    refused: list[dict[str, Any]] = field(default_factory=list)  # by Ometria, when pushed
    state: ListState | None = None

    @property
    def still_dead(self) -> list[dict[str, Any]]:
        return self.plan.failing + self.refused


def plan(rows: list[dict[str, Any]], collection: str, force_optin: bool = False) -> ReplayPlan:
    """Run the current parser, mapping and validation on dead letters: the one path of both the
    replay and its dry run."""
    failing: list[dict[str, Any]] = []
    by_stage: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for r in rows:
        try:
            by_stage.setdefault(r["stage"], []).append((r, orjson.loads(r["payload"])))
        except orjson.JSONDecodeError:
            failing.append(r | {"reason": f"{r['reason']} (payload not readable: a full refresh fetches it again)"})
    staged: list[pa.Table] = []
    if "staging" in by_stage:
        members = [doc for _, doc in by_stage["staging"]]
        table, dead = parse_page(orjson.dumps({"members": members, "total_items": len(members)}))
        failing += dead
        staged.append(table)
    if "transform" in by_stage:
        staged.append(_staged_rows([doc for _, doc in by_stage["transform"]]))
    records: list[dict[str, Any]] = []
    for table in staged:
        good, dead = to_contacts(table, collection, force_optin)
        records += record_dicts(good)
        failing += as_table(dead).to_pylist()
    for r, record in by_stage.get("import", []):
        size = len(orjson.dumps(record))
        if size > MAX_RECORD_BYTES:
            failing.append(r | {"reason": f"record over Ometria's 60 KB limit ({size} bytes as sent)"})
        else:
            records.append(record)
    return ReplayPlan(tried=len(rows), records=records, failing=failing)


def _staged_rows(docs: list[dict[str, Any]]) -> pa.Table:
    """Staged rows from their JSON (timestamps as ISO strings) back to the staging schema."""
    table = pa.Table.from_pylist(docs)
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in STAGING_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=STAGING_SCHEMA)


def push(ometria: Any, client: Any, list_id: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The replay's push, through the Ometria client's `push_batches`: the dead letters of what
    Ometria refused (at once or after the answer)."""
    from mc_pipeline.resources.ometria import MAX_RECORDS, PushStats

    batches = [records[start : start + MAX_RECORDS] for start in range(0, len(records), MAX_RECORDS)]
    om = ometria.client(client)
    try:
        return om.push_batches(batches, PushStats(), list_id=list_id).dead_letters(batches)
    finally:
        om.close()


def replay(
    partition: str,
    *,
    storage: PipelineStorage,
    ometria: Any,
    client: Any,
    run_id: str | None = None,
    dry_run: bool = False,
    limit: float = 0.01,
) -> ReplayResult:
    """Replay a list's outstanding dead letters (or one run's); what passes leaves the store."""
    _, list_id = partition.split(":", 1)
    table = (store := outstanding(storage, partition)).read()
    chosen = pc.equal(table.column("run_id"), run_id) if run_id else pa.array([True] * table.num_rows, pa.bool_())
    chosen_rows = table.filter(chosen).to_pylist()
    result = ReplayResult(plan(chosen_rows, client.collection(list_id), client.ometria.force_optin))
    if dry_run or not result.plan.tried:
        return result
    if result.plan.records:
        result.refused = push(ometria, client, list_id, result.plan.records)
        refused_ids = {d["record_id"] for d in result.refused}
        through = [r for r in result.plan.records if r.get("id") not in refused_ids]
        if through:
            storage.known_contacts(partition).add(
                f"replay-{int(time.time())}",
                pa.table({"id": [r["id"] for r in through], "email": [r.get("email") for r in through]}),
            )
    current = store.read()  # again: a sync may have recorded some since; only the replayed ones are replaced
    rest = current.filter(pc.invert(pc.is_in(current.column("key"), value_set=table.filter(chosen).column("key"))))
    pending = pa.concat_tables([rest, _keyed(as_table(result.still_dead), f"replay-{int(time.time())}")])
    store.write(pending)
    result.state = state_of(pending, storage, partition, limit)
    return result


def report(instance: Any, partition: str, state: ListState) -> None:
    """A replay's effect, as an observation of `ometria/contacts` the check reads when next run. (Not a
    runless check evaluation: Dagster 1.13 keeps one per partition; a second breaks its unique key.)"""
    from dagster import AssetObservation

    from mc_pipeline.assets.keys import CONTACTS_KEY

    event = AssetObservation(asset_key=CONTACTS_KEY, partition=partition, metadata=state.metadata())
    instance.report_runless_asset_event(event)
