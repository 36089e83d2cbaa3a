"""`ometria/contacts`: a graph-backed asset, transform op -> import op, so the push shows as its own op.

The asset is materialized only when the import op succeeds; its `watermark` metadata is what
the next run's window starts from, so a failed or partial import never moves it.
"""

# No `from __future__ import annotations` here: Dagster reads these signatures at definition time.

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetIn,
    Config,
    MetadataValue,
    OpExecutionContext,
    Out,
    Output,
    graph_asset,
    op,
)
from pydantic import Field

from mc_pipeline.assets.keys import CONTACTS_KEY, GROUP, MEMBERS_KEY, OWNERS
from mc_pipeline.assets.mailchimp import failure
from mc_pipeline.assets.metadata import parquet_metadata, table_schema, window_metadata
from mc_pipeline.assets.models import ContactsFile, ImportResult, StagedMembers
from mc_pipeline.assets.watermarks import known_until, watermark_metadata
from mc_pipeline.dead_letters import ListState, settle_run, write_run_file
from mc_pipeline.partitions import mailchimp_lists
from mc_pipeline.reconcile import Backlog, KnownHashes, listed_keys, tombstones
from mc_pipeline.resources import ClientRegistryResource, OmetriaResource
from mc_pipeline.resources.errors import ApiError
from mc_pipeline.resources.ometria import MAX_RECORDS, OmetriaClient, PushStats
from mc_pipeline.resources.ometria_outcome import PushOutcome
from mc_pipeline.resources.ometria_push import Fanout
from mc_pipeline.staging import id_keys
from mc_pipeline.storage import KnownContacts, PipelineStorage, RunFolder, load_keys, save_keys
from mc_pipeline.transform import CONTACT_SCHEMA, contact_ids, record_dicts, record_hashes, to_contacts

CONTACTS_COLUMNS = table_schema(CONTACT_SCHEMA)  # fixed: the UI shows it before the first sync
CHECKPOINT_RECORDS = 20_000  # 25 s of pushing at 800 records/s; the next part pushes while one is recorded
HASH_ROWS = 10_000  # rows hashed at once: the per-call cost of the column-wise hash is spread thin
PUSH_ROWS = 1_000  # rows sorted into the backlog at once, so a checkpoint falls every 1,000 rows read


@op(out=Out(ContactsFile, io_manager_key="state_io_manager"), tags={"kind": "arrow"})
def to_ometria_records(
    context: OpExecutionContext, members: StagedMembers, registry: ClientRegistryResource, storage: PipelineStorage
) -> Output[ContactsFile]:
    """Staged members -> Ometria contact records (Parquet), row group by row group."""
    run = members.run
    client, _ = registry.client_for_partition(run.partition)
    collection = client.collection(run.list_id)
    folder = storage.run_folder(run.partition, run.run_id)
    started = time.monotonic()
    done = _convert(members, folder, collection, client.ometria.force_optin)
    if done.dead:
        write_run_file(folder.root, "transform", pa.concat_tables(done.dead))
        context.log.warning(f"{run.partition}: {done.dead_rows} members cannot become Ometria contacts (dead letters)")
    records, dead_rows = done.records, done.dead_rows
    metadata = parquet_metadata(
        folder.contacts, CONTACT_SCHEMA, records, ["id", "email", "marketing_optin", "country_id", "timestamp_acquired"]
    )
    metadata.update(collection=collection, dead_letters=dead_rows, seconds=round(time.monotonic() - started, 3))
    return Output(
        ContactsFile(
            run=run,
            total_items=members.total_items,
            staged_rows=members.rows,
            path=str(folder.contacts),
            collection=collection,
            records=records,
            dead_letters=members.dead_letters + dead_rows,
            listed=str(folder.listed) if done.listed is not None else None,
        ),
        metadata=metadata,
    )


@dataclass
class _Converted:
    records: int = 0
    dead: list[pa.Table] = field(default_factory=list)
    listed: list[np.ndarray] | None = None  # on a full refresh: the keys of every member listed

    @property
    def dead_rows(self) -> int:
        return sum(t.num_rows for t in self.dead)


def _convert(members: StagedMembers, folder: RunFolder, collection: str, force_optin: bool) -> _Converted:
    """Row group by row group: the records to `folder.contacts`, the dead letters aside and, on a full refresh,
    the keys of every member listed (paged or after the bound) to `folder.listed`: the import judges by them."""
    done = _Converted(listed=[folder.after_bound_keys()] if members.run.window.full_refresh else None)
    source = pq.ParquetFile(members.path)
    with pq.ParquetWriter(folder.contacts, CONTACT_SCHEMA, compression="zstd") as out:
        for i in range(source.num_row_groups):
            staged = source.read_row_group(i)
            good, dead = to_contacts(staged, collection, force_optin)
            out.write_table(good)
            done.records += good.num_rows
            if dead.num_rows:
                done.dead.append(dead)
            if done.listed is not None:
                done.listed.append(id_keys(contact_ids(staged).drop_null()))
    if done.listed is not None:
        save_keys(folder.listed, listed_keys(done.listed))
    return done


class ImportConfig(Config):
    checkpoint_records: int = Field(
        default=CHECKPOINT_RECORDS,
        ge=MAX_RECORDS,
        description="records pushed between two recordings of what Ometria accepted: a crashed run's "
        "re-run pushes again at most this many of those it had pushed (and those pushed while their "
        "errors were looked up)",
    )


@op(out=Out(ImportResult, io_manager_key="state_io_manager"), tags={"kind": "ometria"})
def import_to_ometria(
    context: OpExecutionContext,
    config: ImportConfig,
    contacts: ContactsFile,
    registry: ClientRegistryResource,
    ometria: OmetriaResource,
    storage: PipelineStorage,
) -> Output[ImportResult]:
    """Push the records Ometria does not already hold as they are, in batches of 100 at the account's
    rate (every record with `push_all`); fail at once on auth or quota."""
    run = contacts.run
    client, _ = registry.client_for_partition(run.partition)
    stats = PushStats()
    started = time.monotonic()
    known = storage.known_contacts(run.partition, run.destination.id if run.destination else None)
    had_history = bool(known.files())  # on a list's first sync there is nothing to reconcile
    om = ometria.client(client, logger=context.log)  # one per import: its connections and its stop flag
    try:
        if contacts.records:
            pushed = _push_changes(context, contacts, om, stats, known, config.checkpoint_records)
        else:
            pushed = Pushed()
            context.log.info(f"{run.partition}: nothing changed in {run.window.describe()}; no Ometria call")
        contacts_pushed, rejected = stats.pushed, pushed.rejected
        deleted, reconcile_started = 0, time.monotonic()
        if run.window.full_refresh and had_history:
            deleted, tombstones_rejected = _reconcile(context, contacts, om, known, stats)
            rejected = rejected + tombstones_rejected
        reconcile_s = time.monotonic() - reconcile_started
    finally:
        om.close()
    accepted = contacts.records - pushed.skipped - len(pushed.rejected)
    stats.seconds = time.monotonic() - started
    dead, pending, dead_md = _settle(context, storage, ometria, contacts, rejected)
    result = ImportResult(
        run=run,
        collection=contacts.collection,
        records=contacts.records,
        unchanged_skipped=pushed.skipped,
        pushed=contacts_pushed,
        accepted=accepted,
        rejected=contacts.records - pushed.skipped - accepted,
        dead_letters=dead,
        watermark=run.window.before,
    )
    metadata = _import_metadata(contacts, result, stats, deleted, pending, dead_md, reconcile_s)
    return Output(result, metadata=metadata)


def _settle(
    context: OpExecutionContext,
    storage: PipelineStorage,
    ometria: OmetriaResource,
    contacts: ContactsFile,
    rejected: list[dict],
) -> tuple[int, ListState, dict]:
    """The run's dead letters into the list's store, then the old run folders pruned: (the run's
    dead letters, the list's state, their metadata)."""
    run = contacts.run
    folder = storage.run_folder(run.partition, run.run_id)
    # A dead letter never holds the watermark back: it goes to the list's outstanding store, and
    # the check `dead_letters_within_share` alerts when those pass a share of the list.
    write_run_file(folder.root, "import", rejected)
    dead, pending, dead_md = settle_run(storage, run, Path(contacts.path), ometria.max_dead_letter_share)
    if dead:
        context.log.warning(
            f"{run.partition}: {dead} dead letters in this run ({len(rejected)} rejected by Ometria, "
            f"{contacts.dead_letters} not convertible); {pending.outstanding} outstanding for the list: "
            f"see `mc-pipeline dead-letters list {run.partition}`"
        )
    if not pending.passed:
        context.log.error(pending.describe())
    pruned = storage.prune(run.partition, keep_also=(run.run_id,))
    if pruned:
        context.log.info(f"{run.partition}: pruned {len(pruned)} old run folders")
    return dead, pending, dead_md


def _import_metadata(
    contacts: ContactsFile,
    result: ImportResult,
    stats: PushStats,
    deleted: int,
    pending: ListState,
    dead_md: dict,
    reconcile_s: float = 0.0,
) -> dict[str, Any]:
    """What `ometria/contacts` records of an import: the watermark for the next run, then the counts."""
    run = contacts.run
    return {
        # The asset's materialization: what the UI shows of `ometria/contacts` (the transform op's
        # output is only a step of it), the records as written and pushed, then the window and push.
        "list_name": MetadataValue.text(run.list_name),
        "dagster/row_count": contacts.records,
        "dagster/column_schema": CONTACTS_COLUMNS,
        "dagster/uri": MetadataValue.path(contacts.path),
        **watermark_metadata(run),
        **window_metadata(run.window),
        "full_refresh": run.window.full_refresh,
        "push_all": run.push_all,
        "collection": contacts.collection,
        "mailchimp_total_items": contacts.total_items,
        "staged_rows": contacts.staged_rows,
        "records": contacts.records,
        "unchanged_skipped": result.unchanged_skipped,
        "pushed": result.pushed,
        "accepted": result.accepted,
        "rejected": result.rejected,
        "resent_to_isolate_rejections": stats.resent,
        "failed_after_answer": stats.failed_after_answer,
        "error_lookups": stats.lookups,
        "deleted_in_mailchimp_opted_out": deleted,
        "dead_letters": result.dead_letters,
        **dead_md,
        **pending.metadata(),
        "requests": stats.requests,
        "throttled_429": stats.throttled,
        "retries": stats.retries,
        "retry_causes": MetadataValue.json(stats.causes),
        "seconds": round(stats.seconds, 3),
        "reconcile_seconds": round(reconcile_s, 3),  # of `seconds`: the deletions judged, the tombstones pushed
        "records_per_second": round(stats.pushed / stats.seconds, 1) if stats.seconds else 0.0,
        "run_folder": MetadataValue.path(run.folder),
    }


def _reconcile(
    context: OpExecutionContext,
    contacts: ContactsFile,
    om: OmetriaClient,
    known: KnownContacts,
    stats: PushStats,
) -> tuple[int, list[dict]]:
    """On a full refresh, opt out the contacts whose member Mailchimp deleted outright (a full fetch
    is the only way to notice a deletion). Returns how many, and the dead letters of any Ometria refused."""
    run = contacts.run
    if contacts.listed is None:  # a descriptor written before `listed`: judge at the next full refresh
        context.log.warning(f"{run.partition}: the transform handed no listed members on; deletions not judged")
        return 0, []
    listed = load_keys(Path(contacts.listed))
    gone = known.reconcile(listed, id_keys, judged_until=known_until(run.window))
    dead: list[dict] = []
    if gone.num_rows:
        context.log.warning(
            f"{run.partition}: {gone.num_rows} contacts pushed before are no longer in Mailchimp (deleted); "
            "opting them out in Ometria"
        )
        batches = [tombstones(b, contacts.collection, run.window.before) for b in gone.to_batches(MAX_RECORDS)]
        dead = _push(context, om, stats, run.list_id, batches)
    return gone.num_rows, dead


@dataclass
class Pushed:
    """What a push of a list's records did: the dead letters of what Ometria refused, how many were skipped."""

    rejected: list[dict] = field(default_factory=list)
    skipped: int = 0


def _push_changes(
    context: OpExecutionContext,
    contacts: ContactsFile,
    om: OmetriaClient,
    stats: PushStats,
    known: KnownContacts,
    checkpoint: int,
) -> Pushed:
    """Stream the records from Parquet; skip those whose exact bytes Ometria last accepted (their hash
    in `known`), push the others as they are read. Every `checkpoint` records pushed, once Ometria's
    answers and errors of those are in (while the next ones push), record what it accepted (and the
    skipped, seen again): a crash loses at most that much progress plus what was pushed while its
    last errors were looked up, and a record refused after the answer never counts as held."""
    run = contacts.run
    backlog = Backlog(KnownHashes.none() if run.push_all else known.hashes(id_keys))
    out = Pushed()
    part = 0

    def progress(s: PushStats) -> None:
        context.log.info(
            f"{run.partition}: {s.pushed} records pushed, {backlog.skipped}/{contacts.records} unchanged skipped, "
            f"{s.requests} requests, {s.throttled} throttled"
        )

    def record(batches: list[list[dict]], recorded: pa.Table | None, outcome: PushOutcome) -> None:
        nonlocal part
        dead = outcome.dead_letters(batches) if outcome.refused else []
        out.rejected += dead
        if recorded is not None:
            # `seen`: see KnownContacts: a full refresh beside this run must not judge them
            known.add(run.run_id, recorded, exclude={d["record_id"] for d in dead}, seen=run.window.before, part=part)
            part += 1

    # The skip pass: hashes and keys column-wise, 10,000 rows at a time; records only for what changed,
    # pushed as they are read.
    with _pushing(context, om, stats, run.list_id, progress) as fanout:
        pushed: list[list[dict]] = []  # since the last checkpoint: its dead letters are built from them
        for chunk in pq.ParquetFile(contacts.path).iter_batches(batch_size=HASH_ROWS):
            hashes, keys = record_hashes(chunk), id_keys(chunk.column("id"))
            for start in range(0, chunk.num_rows, PUSH_ROWS):
                batch = chunk.slice(start, PUSH_ROWS)
                end = start + batch.num_rows
                changed = partial(_records_of, batch)
                backlog.add(batch.column("id"), batch.column("email"), keys[start:end], hashes[start:end], changed)
                pushed += (batches := backlog.take(MAX_RECORDS, final=False))
                fanout.push(batches)
                if backlog.due(checkpoint):
                    fanout.close_part(partial(record, pushed, backlog.checkpoint()))
                    pushed = []
        pushed += (batches := backlog.take(MAX_RECORDS, final=True))
        fanout.push(batches)
        fanout.close_part(partial(record, pushed, backlog.checkpoint()))
    out.skipped = backlog.skipped
    if out.skipped:
        context.log.info(f"{run.partition}: {out.skipped} of {contacts.records} records unchanged in Ometria: skipped")
    return out


def _records_of(batch: pa.RecordBatch, changed: np.ndarray) -> list[dict]:
    """The records to push of a batch's changed rows (`Backlog.add`): unchanged rows never become dicts."""
    return record_dicts(batch.filter(pa.array(changed)))


@contextmanager
def _pushing(
    context: OpExecutionContext,
    om: OmetriaClient,
    stats: PushStats,
    list_id: str,
    progress: Callable[[PushStats], None] | None = None,
) -> Iterator[Fanout]:
    """A push in parts with the client (see `Fanout`): an API error as the op's failure, and a warning
    for the records Ometria's answers accepted that failed its validation later."""
    late_before = stats.failed_after_answer
    try:
        with om.fanout(stats, list_id=list_id, progress=progress) as fanout:
            yield fanout
    except ApiError as exc:
        raise failure(exc) from None
    if stats.failed_after_answer > late_before:
        context.log.warning(
            f"{om.client_id}:{list_id}: {stats.failed_after_answer - late_before} records accepted by Ometria's answer "
            "failed its validation later (GET /push/_errors): dead letters, not recorded as held"
        )


def _push(
    context: OpExecutionContext, om: OmetriaClient, stats: PushStats, list_id: str, batches: list[list[dict]]
) -> list[dict]:
    """One push of these batches: the dead letters of what Ometria refused (refusals name a batch and
    a place, so the batches are read again to build them)."""
    dead: list[dict] = []
    with _pushing(context, om, stats, list_id) as fanout:
        fanout.push(batches)
        fanout.close_part(lambda outcome: dead.extend(outcome.dead_letters(batches) if outcome.refused else []))
    return dead


@graph_asset(
    key=CONTACTS_KEY,
    partitions_def=mailchimp_lists,
    group_name=GROUP,
    owners=OWNERS,
    kinds={"ometria", "parquet"},
    metadata={"dagster/column_schema": CONTACTS_COLUMNS},
    ins={"members": AssetIn(key=MEMBERS_KEY)},
    description="The list's members as Ometria contact records, pushed to the client's Ometria account.",
)
def contacts(members):
    return import_to_ometria(to_ometria_records(members))
