"""`mc-pipeline dead-letters list|replay PARTITION`: inspect, and after a fix push again.

A dead letter keeps what is needed to try again: the raw member (staging), the staged row
(transform) or the Ometria record (import). Replaying runs the current code on it — the
parser, the mapping, the push — so a fixed bug or a corrected Ometria rule lets it through.
What still fails stays, with its new reason; what passes is recorded as known to Ometria.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from mc_pipeline.assets.metadata import mask
from mc_pipeline.registry import YamlClientRegistry, parse_partition_key
from mc_pipeline.resources.ometria import MAX_RECORDS, OmetriaResource, PushStats
from mc_pipeline.staging import DEAD_LETTER_SCHEMA, STAGING_SCHEMA, dead_letter, parse_page
from mc_pipeline.storage import PipelineStorage
from mc_pipeline.transform import record_dicts, to_contacts


def dead_letter_files(storage: PipelineStorage, partition: str, run_id: str | None = None) -> list[Path]:
    runs = storage.partition_dir(partition) / "runs"
    folders = [runs / run_id] if run_id else sorted(runs.glob("*")) if runs.is_dir() else []
    return sorted(f for folder in folders for f in folder.glob("dead_letters-*.parquet"))


def load(files: list[Path]) -> list[dict[str, Any]]:
    return [row | {"_file": str(f)} for f in files for row in pq.read_table(f).to_pylist()]


def describe(rows: list[dict[str, Any]], limit: int = 20) -> str:
    if not rows:
        return "no dead letters"
    counts = Counter(f"{r['stage']}: {r['reason']}" for r in rows)
    lines = [f"{len(rows)} dead letters"] + [f"  {n:>6}  {reason}" for reason, n in counts.most_common()]
    lines.append("first ones:")
    for r in rows[:limit]:
        payload = orjson.loads(r["payload"]) if r["payload"] else {}
        email = payload.get("email") or payload.get("email_address") if isinstance(payload, dict) else None
        lines.append(
            f"  {r['stage']:<9} member {r['member_id'] or '-':<32} record {r['record_id'] or '-':<32} "
            f"{mask(email)}  {r['reason'][:100]}"
        )
    return "\n".join(lines)


@dataclass
class ReplayResult:
    tried: int
    pushed: int
    still_dead: list[dict[str, Any]]


def _staged_rows(rows: list[dict[str, Any]]) -> pa.Table:
    """Staged rows from their JSON (timestamps as ISO strings) back to the staging schema."""
    table = pa.Table.from_pylist([orjson.loads(r["payload"]) for r in rows])
    columns = []
    for field in STAGING_SCHEMA:
        columns.append(
            table.column(field.name).cast(field.type)
            if field.name in table.column_names
            else pa.nulls(table.num_rows, field.type)
        )
    return pa.Table.from_arrays(columns, schema=STAGING_SCHEMA)


def replay(
    partition: str,
    *,
    storage: PipelineStorage,
    ometria: OmetriaResource,
    registry_path: str,
    run_id: str | None = None,
    dry_run: bool = False,
) -> ReplayResult:
    client_id, list_id = parse_partition_key(partition)
    client = YamlClientRegistry(registry_path).client(client_id)
    collection = client.collection(list_id)
    files = dead_letter_files(storage, partition, run_id)
    rows = load(files)
    records: list[dict[str, Any]] = []
    still: list[dict[str, Any]] = []
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append(r)
    staged_tables: list[pa.Table] = []
    if "staging" in by_stage:
        members = [orjson.loads(r["payload"]) for r in by_stage["staging"]]
        staged, dead = parse_page(orjson.dumps({"members": members, "total_items": len(members)}))
        still += dead
        staged_tables.append(staged)
    if "transform" in by_stage:
        staged_tables.append(_staged_rows(by_stage["transform"]))
    for staged in staged_tables:
        good, dead = to_contacts(staged, collection)
        records += record_dicts(good)
        still += dead.to_pylist()
    records += [orjson.loads(r["payload"]) for r in by_stage.get("import", [])]
    pushed = 0
    if records and not dry_run:
        om = ometria.client(client)
        stats = PushStats()
        try:
            for start in range(0, len(records), MAX_RECORDS):
                batch = records[start : start + MAX_RECORDS]
                refused = om.push_records(batch, stats, list_id=list_id)
                still += [dead_letter("import", None, rec.get("id"), f"Ometria: {why}", rec) for rec, why in refused]
                pushed += len(batch) - len(refused)
        finally:
            om.close()
        known = [r for r in records if r.get("id") not in {d["record_id"] for d in still}]
        storage.known_contacts(partition).add(
            f"replay-{int(time.time())}",
            pa.table({"id": [r["id"] for r in known], "email": [r.get("email") for r in known]}),
        )
        for f in files:  # what remains is what still fails, in one file per run folder
            f.unlink()
        if still:
            target = files[-1].parent / "dead_letters-replayed.parquet"
            pq.write_table(
                pa.Table.from_pylist(
                    [{k: d.get(k) for k in DEAD_LETTER_SCHEMA.names} for d in still], schema=DEAD_LETTER_SCHEMA
                ),
                target,
            )
    return ReplayResult(tried=len(rows), pushed=pushed, still_dead=still)
