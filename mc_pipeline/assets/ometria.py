"""`ometria/contacts`: a graph-backed asset, transform op -> import op, so the push shows as its own op.

The asset is materialized only when the import op succeeds; its `watermark` metadata is what
the next run's window starts from, so a failed or partial import never moves it.
"""

# No `from __future__ import annotations` here: Dagster reads these signatures at definition time.

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetIn,
    MetadataValue,
    OpExecutionContext,
    Out,
    Output,
    graph_asset,
    op,
)

from mc_pipeline.assets.mailchimp import GROUP, MEMBERS_KEY, failure
from mc_pipeline.assets.metadata import parquet_metadata
from mc_pipeline.assets.models import ContactsFile, ImportResult, StagedMembers
from mc_pipeline.assets.watermarks import CONTACTS_KEY, known_until, watermark_metadata
from mc_pipeline.dead_letters import settle_run, write_run_file
from mc_pipeline.partitions import mailchimp_lists
from mc_pipeline.resources import ClientRegistryResource, OmetriaResource
from mc_pipeline.resources.errors import ApiError
from mc_pipeline.resources.ometria import MAX_RECORDS, PushStats
from mc_pipeline.staging import id_keys
from mc_pipeline.storage import PipelineStorage, RunFolder
from mc_pipeline.transform import CONTACT_SCHEMA, contact_ids, record_dicts, to_contacts, tombstones


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
    source = pq.ParquetFile(members.path)
    records = dead_rows = 0
    dead_tables = []
    with pq.ParquetWriter(folder.contacts, CONTACT_SCHEMA, compression="zstd") as out:
        for i in range(source.num_row_groups):
            good, dead = to_contacts(source.read_row_group(i), collection, client.ometria.force_optin)
            out.write_table(good)
            records += good.num_rows
            dead_rows += dead.num_rows
            if dead.num_rows:
                dead_tables.append(dead)
    if dead_tables:
        write_run_file(folder.root, "transform", pa.concat_tables(dead_tables))
        context.log.warning(f"{run.partition}: {dead_rows} members cannot become Ometria contacts (dead letters)")
    metadata = parquet_metadata(
        folder.contacts, CONTACT_SCHEMA, records, ["id", "email", "marketing_optin", "country_id", "timestamp_acquired"]
    )
    metadata.update(
        {"collection": collection, "dead_letters": dead_rows, "seconds": round(time.monotonic() - started, 3)}
    )
    return Output(
        ContactsFile(
            run=run,
            total_items=members.total_items,
            staged_rows=members.rows,
            path=str(folder.contacts),
            collection=collection,
            records=records,
            dead_letters=members.dead_letters + dead_rows,
        ),
        metadata=metadata,
    )


@op(out=Out(ImportResult, io_manager_key="state_io_manager"), tags={"kind": "ometria"})
def import_to_ometria(
    context: OpExecutionContext,
    contacts: ContactsFile,
    registry: ClientRegistryResource,
    ometria: OmetriaResource,
    storage: PipelineStorage,
) -> Output[ImportResult]:
    """Push every record in batches of 100 at the account's rate; fail at once on auth or quota."""
    run = contacts.run
    client, _ = registry.client_for_partition(run.partition)
    stats = PushStats()
    started = time.monotonic()
    rejected: list[dict] = []
    if contacts.records:
        context.log.info(f"{run.partition}: pushing {contacts.records} contacts to Ometria ({contacts.collection})")
        rejected = _push_contacts(context, contacts, client, ometria, stats)
    else:
        context.log.info(f"{run.partition}: nothing changed in {run.window.describe()}; no Ometria call")
    folder = storage.run_folder(run.partition, run.run_id)
    deleted, tombstones_rejected = _remember_and_reconcile(context, contacts, client, ometria, storage, rejected, stats)
    accepted = contacts.records - len(rejected)
    rejected += tombstones_rejected
    stats.seconds = time.monotonic() - started
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
    result = ImportResult(
        run=run,
        collection=contacts.collection,
        records=contacts.records,
        pushed=stats.pushed,
        accepted=accepted,
        rejected=contacts.records - accepted,
        dead_letters=dead,
        watermark=run.window.before,
    )
    return Output(
        result,
        metadata={
            **watermark_metadata(run),
            "window_since": MetadataValue.text(run.window.since.isoformat() if run.window.since else "(full sync)"),
            "full_refresh": run.window.full_refresh,
            "collection": contacts.collection,
            "mailchimp_total_items": contacts.total_items,
            "staged_rows": contacts.staged_rows,
            "records": contacts.records,
            "pushed": stats.pushed,
            "accepted": accepted,
            "rejected": contacts.records - accepted,
            "resent_to_isolate_rejections": stats.resent,
            "failed_after_answer": stats.failed_after_answer,
            "error_lookups": stats.lookups,
            "deleted_in_mailchimp_opted_out": deleted,
            "dead_letters": dead,
            **dead_md,
            **pending.metadata(),
            "requests": stats.requests,
            "throttled_429": stats.throttled,
            "retries": stats.retries,
            "retry_causes": MetadataValue.json(stats.causes),
            "seconds": round(stats.seconds, 3),
            "records_per_second": round(stats.pushed / stats.seconds, 1) if stats.seconds else 0.0,
            "run_folder": MetadataValue.path(run.folder),
        },
    )


def _remember_and_reconcile(
    context: OpExecutionContext,
    contacts: ContactsFile,
    client,
    ometria: OmetriaResource,
    storage: PipelineStorage,
    rejected: list[dict],
    stats: PushStats,
) -> tuple[int, list[dict]]:
    """Record the contacts Ometria now holds for this list; on a full refresh, opt out those whose
    member Mailchimp deleted outright (a full fetch is the only way to notice a deletion).

    Returns how many were opted out, and the dead letters of any Ometria refused.
    """
    run = contacts.run
    known = storage.known_contacts(run.partition, run.destination.id if run.destination else None)
    had_history = bool(known.files())  # on a list's first sync there is nothing to reconcile
    # Seen at this run's window bound: a full refresh running beside this one (or started before
    # it) listed only members changed up to its own bound, so it must not judge these.
    known.add(run.run_id, Path(contacts.path), exclude={d["record_id"] for d in rejected}, seen=run.window.before)
    if not run.window.full_refresh or not had_history:
        return 0, []
    staged = pq.ParquetFile(RunFolder(Path(run.folder)).members)
    listed = np.unique(
        np.concatenate(
            [np.zeros(0, dtype=np.uint64)]
            + [
                id_keys(contact_ids(pa.Table.from_batches([b])).drop_null())
                for b in staged.iter_batches(batch_size=50_000, columns=["contact_id", "unique_email_id"])
            ]
        )
    )
    gone = known.reconcile(listed, id_keys, judged_until=known_until(run.window))
    dead: list[dict] = []
    if gone.num_rows:
        context.log.warning(
            f"{run.partition}: {gone.num_rows} contacts pushed before are no longer in Mailchimp (deleted); "
            "opting them out in Ometria"
        )
        batches = [tombstones(b, contacts.collection, run.window.before) for b in gone.to_batches(MAX_RECORDS)]
        dead = _push(context, client, ometria, stats, run.list_id, lambda: iter(batches))
    return gone.num_rows, dead


def _push_contacts(
    context: OpExecutionContext, contacts: ContactsFile, client, ometria: OmetriaResource, stats: PushStats
) -> list[dict]:
    """Batches stream from Parquet to the client's pushers; the dead letters of what Ometria refused."""

    def batches() -> Iterator[list[dict]]:
        return (record_dicts(b) for b in pq.ParquetFile(contacts.path).iter_batches(batch_size=MAX_RECORDS))

    def progress(s: PushStats) -> None:
        context.log.info(
            f"{contacts.run.partition}: {s.pushed}/{contacts.records} records pushed, "
            f"{s.requests} requests, {s.throttled} throttled"
        )

    return _push(context, client, ometria, stats, contacts.run.list_id, batches, progress)


def _push(
    context: OpExecutionContext,
    client,
    ometria: OmetriaResource,
    stats: PushStats,
    list_id: str,
    batches: Callable[[], Iterator[list[dict]]],
    progress: Callable[[PushStats], None] | None = None,
) -> list[dict]:
    """One push with the client; `batches()` gives the same batches again to build the dead letters
    (refusals name a batch and a place, so nothing is held in memory while pushing)."""
    om = ometria.client(client, logger=context.log)
    try:
        outcome = om.push_batches(batches(), stats, list_id=list_id, progress=progress)
    except ApiError as exc:
        raise failure(exc) from None
    finally:
        om.close()
    if stats.failed_after_answer:
        context.log.warning(
            f"{client.id}:{list_id}: {stats.failed_after_answer} records accepted by Ometria's answer failed "
            "its validation later (GET /push/_errors): dead letters, not recorded as held"
        )
    return outcome.dead_letters(batches()) if outcome.refused else []


@graph_asset(
    key=CONTACTS_KEY,
    partitions_def=mailchimp_lists,
    group_name=GROUP,
    kinds={"ometria", "parquet"},
    ins={"members": AssetIn(key=MEMBERS_KEY)},
    description="The list's members as Ometria contact records, pushed to the client's Ometria account.",
)
def contacts(members):
    return import_to_ometria(to_ometria_records(members))
