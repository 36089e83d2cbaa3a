"""`mailchimp/member_pages` (raw pages as received) and `mailchimp/members` (the Parquet staging table)."""

# No `from __future__ import annotations` here: Dagster reads these signatures at definition time.

import gzip
import math
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetRecordsFilter,
    Config,
    DagsterInstance,
    Failure,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from mc_pipeline.assets.metadata import parquet_metadata
from mc_pipeline.assets.models import PageSet, RunFiles, StagedMembers, Window
from mc_pipeline.partitions import mailchimp_lists
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.resources.errors import ApiError
from mc_pipeline.resources.mailchimp import FetchStats, Page
from mc_pipeline.staging import DEAD_LETTER_SCHEMA, STAGING_SCHEMA, StagingWriter
from mc_pipeline.storage import PipelineStorage

PAGES_KEY = AssetKey(["mailchimp", "member_pages"])
MEMBERS_KEY = AssetKey(["mailchimp", "members"])
CONTACTS_KEY = AssetKey(["ometria", "contacts"])
GROUP = "mailchimp_to_ometria"
WATERMARK = "watermark"


class SyncConfig(Config):
    full_refresh: bool = Field(False, description="ignore the watermark and fetch the whole list")


def latest_watermark(instance: DagsterInstance, partition: str) -> datetime | None:
    """`before_last_changed` of this partition's latest successful import, from Dagster's history."""
    result = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=CONTACTS_KEY, asset_partitions=[partition]), limit=1
    )
    for record in result.records:
        mat = record.asset_materialization
        value = mat.metadata.get(WATERMARK) if mat else None
        if value is not None:
            return datetime.fromtimestamp(float(value.value), UTC)
    return None


def run_started_at(instance: DagsterInstance, run_id: str) -> datetime:
    record = instance.get_run_record_by_id(run_id)
    started = (record.start_time if record else None) or time.time()
    return datetime.fromtimestamp(started, UTC)


def sync_window(context: AssetExecutionContext, full_refresh: bool) -> Window:
    """since = the last import's watermark (none, or a full refresh: the whole list);
    before = one second before the run's start, so a change in the very second the run began
    (which Mailchimp stamps with that second) falls in the next window, never in a gap."""
    before = run_started_at(context.instance, context.run.run_id).replace(microsecond=0) - timedelta(seconds=1)
    since = None if full_refresh else latest_watermark(context.instance, context.partition_key)
    if since is not None and since >= before:
        since = before  # a clock step back: an empty window rather than an inverted one
    return Window(since=since, before=before, full_refresh=since is None)


def failure(exc: ApiError) -> Failure:
    return Failure(
        description=str(exc),
        metadata={
            "client": exc.client_id,
            "list": exc.list_id or "",
            "cause": exc.cause,
            "retryable": exc.retryable,
            "error": type(exc).__name__,
        },
        allow_retries=exc.retryable,
    )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@asset(
    key=PAGES_KEY,
    partitions_def=mailchimp_lists,
    group_name=GROUP,
    kinds={"mailchimp", "json"},
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
    partition = context.partition_key
    client, list_id = registry.client_for_partition(partition)
    window = sync_window(context, config.full_refresh)
    folder = storage.run_folder(partition, context.run.run_id)
    folder.pages.mkdir(parents=True, exist_ok=True)
    context.log.info(
        f"{partition}: {'full' if window.full_refresh else 'incremental'} sync of list {list_id}, "
        f"last_changed in {window.describe()}"
    )

    def on_page(page: Page) -> None:
        _write_atomic(folder.page(page.offset), gzip.compress(page.raw, compresslevel=1))

    last_log = [time.monotonic()]

    def on_progress(stats: FetchStats, total: int) -> None:
        if time.monotonic() - last_log[0] >= 10:
            last_log[0] = time.monotonic()
            context.log.info(
                f"{partition}: {stats.pages}/{max(1, math.ceil(total / mailchimp.page_size))} pages, "
                f"{stats.members}/{total} members, {stats.calls} calls, {stats.retries} retries"
            )

    try:
        with mailchimp.client(client, logger=context.log) as mc:
            stats, total = mc.fetch_members(
                list_id, since=window.since, before=window.before, on_page=on_page, on_progress=on_progress
            )
    except ApiError as exc:
        raise failure(exc) from None
    run = RunFiles(
        partition=partition,
        client_id=client.id,
        list_id=list_id,
        run_id=context.run.run_id,
        folder=str(folder.root),
        window=window,
    )
    context.log.info(
        f"{partition}: {stats.members} members in {stats.pages} pages, {stats.calls} calls "
        f"({stats.retries} retries, {stats.throttled} throttled) in {stats.seconds:.1f}s"
    )
    return Output(
        PageSet(run=run, total_items=total, pages=stats.pages, members=stats.members),
        metadata={
            "window_since": MetadataValue.text(window.since.isoformat() if window.since else "(full sync)"),
            "window_before": MetadataValue.timestamp(window.before),
            "full_refresh": window.full_refresh,
            "total_items": total,
            "pages": stats.pages,
            "members": stats.members,
            "api_calls": stats.calls,
            "retries": stats.retries,
            "throttled": stats.throttled,
            "retry_causes": MetadataValue.json(stats.causes),
            "bytes": stats.bytes,
            "seconds": round(stats.seconds, 3),
            "folder": MetadataValue.path(str(folder.pages)),
        },
    )


def write_dead_letters(path: Path, rows: list[dict] | pa.Table) -> int:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=DEAD_LETTER_SCHEMA)
    if table.num_rows:
        pq.write_table(table.cast(DEAD_LETTER_SCHEMA), path, compression="zstd")
    return table.num_rows


@asset(
    key=MEMBERS_KEY,
    partitions_def=mailchimp_lists,
    group_name=GROUP,
    kinds={"parquet"},
    ins={"pages": AssetIn(key=PAGES_KEY)},
    io_manager_key="state_io_manager",
    description="Staging table: one typed row per member, de-duplicated by member id (latest last_changed wins).",
)
def members(context: AssetExecutionContext, pages: PageSet, storage: PipelineStorage) -> Output[StagedMembers]:
    run = pages.run
    folder = storage.run_folder(run.partition, run.run_id)
    started = time.monotonic()
    files = sorted(folder.pages.glob("page-*.json.gz"))
    if len(files) != pages.pages:
        raise Failure(
            description=f"{run.partition}: {len(files)} page files in {folder.pages}, expected {pages.pages}",
            allow_retries=False,
        )
    writer = StagingWriter(folder.members)
    try:
        for path in files:
            offset = int(path.name.removeprefix("page-").removesuffix(".json.gz"))
            writer.write_page(gzip.decompress(path.read_bytes()), offset)
        summary = writer.close()
    except BaseException:
        writer.abort()
        raise
    dead = write_dead_letters(folder.root / "dead_letters-staging.parquet", summary.dead_letters)
    if summary.duplicates:
        context.log.warning(
            f"{run.partition}: {summary.duplicates} members appeared on two pages (the list changed while "
            "it was paged); kept the latest version of each"
        )
    metadata = parquet_metadata(
        folder.members,
        STAGING_SCHEMA,
        summary.rows,
        ["member_id", "email_address", "status", "last_changed", "country_code"],
    )
    metadata.update(
        {
            "duplicates_removed": summary.duplicates,
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
