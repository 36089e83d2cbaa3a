"""`mailchimp/member_pages` (raw pages as received) and `mailchimp/members` (the Parquet staging table)."""

# No `from __future__ import annotations` here: Dagster reads these signatures at definition time.

import gzip
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from dagster import (
    AssetExecutionContext,
    AssetIn,
    Config,
    DagsterInstance,
    Failure,
    Output,
    asset,
)
from pydantic import Field, SecretStr

from mc_pipeline.assets.keys import GROUP, MEMBERS_KEY, OWNERS, PAGES_KEY
from mc_pipeline.assets.metadata import (
    PAGE_SCHEMA,
    fetch_summary,
    fetched_window,
    page_set,
    pages_metadata,
    parquet_metadata,
    table_schema,
)
from mc_pipeline.assets.models import PageSet, RunFiles, StagedMembers
from mc_pipeline.assets.watermarks import ListHistory, begin_sync, list_history
from mc_pipeline.dead_letters import write_run_file
from mc_pipeline.partitions import mailchimp_lists
from mc_pipeline.reconcile import listed_keys
from mc_pipeline.registry import Client
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.resources.errors import ApiError
from mc_pipeline.resources.mailchimp import MailchimpClient
from mc_pipeline.resources.paging import AFTER_BOUND_FIELDS, FetchResult
from mc_pipeline.staging import STAGING_SCHEMA, StagingSummary, StagingWriter, id_keys
from mc_pipeline.storage import PipelineStorage, RunFolder, save_keys
from mc_pipeline.tags import started_tags
from mc_pipeline.transform import contact_ids


class SyncConfig(Config):
    full_refresh: bool = Field(default=False, description="ignore the watermark and fetch the whole list")
    push_all: bool = Field(
        default=False,
        description="push every record to Ometria, also those it already holds unchanged (to repair an account)",
    )
    wait_for_other_runs_s: float = Field(
        default=3600.0,
        ge=0,
        description="how long to wait for runs in progress of the same list or account before failing",
    )


def run_started_at(instance: DagsterInstance, run_id: str) -> datetime:
    record = instance.get_run_record_by_id(run_id)
    started = (record.start_time if record else None) or time.time()
    return datetime.fromtimestamp(started, UTC)


def failure(exc: ApiError) -> Failure:
    """The run's failure, naming client, list and cause. `retryable` is metadata for the failure sensor:
    Dagster reads `Failure(allow_retries=)` only under an op `RetryPolicy`, and there is none (transient
    faults are retried inside the run; dagster.yaml's run_retries skip step failures)."""
    return Failure(
        description=str(exc),
        metadata={
            "client": exc.client_id,
            "list": exc.list_id or "",
            "cause": exc.cause,
            "retryable": exc.retryable,
            "error": type(exc).__name__,
        },
    )


def list_name(
    context: AssetExecutionContext, mc: MailchimpClient, list_id: str, refresh: bool, known: str | None
) -> str:
    """Mailchimp's name of the list, for the UI: asked on a full sync (a rename shows within a week)
    or when none is recorded yet, else the one the last run recorded; a sync never fails for it."""
    if known and not refresh:
        return known
    try:
        return mc.list_name(list_id)
    except ApiError as exc:
        context.log.warning(f"{context.partition_key}: the list's name is unknown: {exc}")
        return known or ""


@asset(
    key=PAGES_KEY,
    partitions_def=mailchimp_lists,
    group_name=GROUP,
    owners=OWNERS,
    kinds={"mailchimp", "json"},
    metadata={"dagster/column_schema": PAGE_SCHEMA},
    io_manager_key="state_io_manager",
    description="The list's members in the sync window, one gzipped JSON file per page as Mailchimp sent it.",
)
def member_pages(
    context: AssetExecutionContext,
    config: SyncConfig,
    registry: ClientRegistryResource,
    mailchimp: MailchimpResource,
    storage: PipelineStorage,
) -> Output[PageSet]:
    partition, run_id = context.partition_key, context.run.run_id
    client, list_id = registry.client_for_partition(partition)
    try:  # both accounts' keys, before any request: a bad Ometria key must not wait for the whole fetch
        keys = registry.credentials(client, list_id)
    except ApiError as exc:
        raise failure(exc) from None
    destination, (since, archived_since, *_) = begin_sync(
        context, client, list_id, registry.registry, config.full_refresh, config.wait_for_other_runs_s
    )
    folder = storage.run_folder(partition, run_id)
    context.log.info(
        f"{partition}: {'full' if since is None else 'incremental'} sync of list {list_id}, "
        f"last_changed after {since.isoformat() if since else 'the beginning'}"
    )
    history = list_history(context.instance, partition)
    fetched, name = _fetch(mailchimp, client, context, keys.mailchimp, list_id, folder, since, archived_since, history)
    context.instance.add_run_tags(run_id, started_tags(context.run.tags, config.full_refresh, since is not None, name))
    window = fetched_window(fetched, archived_since)
    run = RunFiles(
        partition=partition,
        client_id=client.id,
        list_id=list_id,
        run_id=run_id,
        folder=str(folder.root),
        window=window,
        destination=destination,
        push_all=config.push_all,
        list_name=name,
    )
    context.log.info(fetch_summary(partition, fetched, window))
    size = fetched.members.members if since is None else history.members  # the next full sync's page count
    metadata = pages_metadata(fetched, window, folder.pages, name, size)
    if since is None:  # on no page, yet in Mailchimp: listed for the import's judgement, not staged
        save_keys(folder.after_bound, after := after_bound_keys(fetched.after_bound))
        metadata["listed_after_bound"] = len(after)
    return Output(page_set(run, fetched), metadata=metadata)


def after_bound_keys(rows: list[dict[str, Any]]) -> np.ndarray:
    """The keys (as the import's `listed`) of the members a full sync listed as changed after its bound."""
    ids = pa.Table.from_pylist(rows, schema=pa.schema([(f, pa.string()) for f in AFTER_BOUND_FIELDS]))
    return listed_keys([id_keys(contact_ids(ids).drop_null())])


@asset(
    key=MEMBERS_KEY,
    partitions_def=mailchimp_lists,
    group_name=GROUP,
    owners=OWNERS,
    metadata={"dagster/column_schema": table_schema(STAGING_SCHEMA)},
    kinds={"parquet"},
    ins={"pages": AssetIn(key=PAGES_KEY)},
    io_manager_key="state_io_manager",
    description="Staging table: one typed row per member, de-duplicated by member id (latest last_changed wins).",
)
def members(context: AssetExecutionContext, pages: PageSet, storage: PipelineStorage) -> Output[StagedMembers]:
    run = pages.run
    folder = storage.run_folder(run.partition, run.run_id)
    started = time.monotonic()
    files = sorted(folder.pages.glob("*.json.gz"))
    if len(files) != pages.pages:
        raise Failure(description=f"{run.partition}: {len(files)} page files in {folder.pages}, expected {pages.pages}")
    summary = _stage(files, folder.members)
    dead = write_run_file(folder.root, "staging", summary.dead_letters)
    _log_duplicates(context, run.partition, summary, dead)
    metadata = parquet_metadata(
        folder.members,
        STAGING_SCHEMA,
        summary.rows,
        ["member_id", "email_address", "status", "last_changed", "country_code"],
    )
    metadata.update(
        {
            "rows_read": summary.rows_read + dead,
            "duplicates_removed": summary.duplicates,
            "overlap_duplicates": summary.overlap_duplicates,
            "changed_duplicates": summary.changed_duplicates,
            "dead_letters": dead,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
    return Output(
        StagedMembers(
            run=run,
            total_items=pages.total_items,
            path=str(folder.members),
            rows=summary.rows,
            duplicates=summary.duplicates,
            dead_letters=dead,
        ),
        metadata=metadata,
    )


def _fetch(
    mailchimp: MailchimpResource,
    client: Client,
    context: AssetExecutionContext,
    key: SecretStr,
    list_id: str,
    folder: RunFolder,
    since: datetime | None,
    archived_since: datetime | None,
    history: ListHistory,
) -> tuple[FetchResult, str]:
    """The window's pages (and the archived sweep) into `folder`, a full sync's sized by the list's
    history, and the list's name; an API error fails the run naming the list."""
    try:
        with mailchimp.client(client, context.log, key) as mc:
            fetched = mc.fetch(
                list_id,
                folder,
                since=since,
                archived_since=archived_since,
                sweep_archived=mailchimp.sweep_archived,
                before_fallback=run_started_at(context.instance, context.run.run_id),
                size_hint=history.members if since is None else None,
            )
            return fetched, list_name(context, mc, list_id, refresh=since is None, known=history.name)
    except ApiError as exc:
        raise failure(exc) from None


def _stage(files: list[Path], target: Path) -> StagingSummary:
    """The pages, in order, into the staging table at `target`, whole or not at all."""
    writer = StagingWriter(target)
    try:
        for path in files:
            offset = int(path.name.removesuffix(".json.gz").rsplit("-", 1)[1])
            writer.write_page(gzip.decompress(path.read_bytes()), offset)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _log_duplicates(context: AssetExecutionContext, partition: str, summary: StagingSummary, dead: int) -> None:
    if summary.duplicates:
        context.log.info(
            f"{partition}: {summary.rows} members staged from {summary.rows_read + dead} rows: "
            f"{summary.overlap_duplicates} read twice by the pages' overlap, {summary.changed_duplicates} older "
            f"versions, {dead} dead letters"
        )
    if summary.changed_duplicates:
        context.log.warning(
            f"{partition}: {summary.changed_duplicates} older versions of members that changed while the list "
            "was paged (read again with another last_changed); kept the latest version of each"
        )
