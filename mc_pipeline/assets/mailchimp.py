"""`mailchimp/member_pages` (raw pages as received) and `mailchimp/members` (the Parquet staging table)."""

# No `from __future__ import annotations` here: Dagster reads these signatures at definition time.

import gzip
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
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
from mc_pipeline.assets.watermarks import CONTACTS_KEY, begin_sync, latest_watermark, latest_watermarks
from mc_pipeline.dead_letters import write_run_file
from mc_pipeline.partitions import mailchimp_lists
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.resources.errors import ApiError
from mc_pipeline.resources.mailchimp import FetchStats, Page, WindowFetch
from mc_pipeline.staging import STAGING_SCHEMA, StagingWriter
from mc_pipeline.storage import PipelineStorage

PAGES_KEY = AssetKey(["mailchimp", "member_pages"])
MEMBERS_KEY = AssetKey(["mailchimp", "members"])
GROUP = "mailchimp_to_ometria"
__all__ = ["CONTACTS_KEY", "latest_watermark", "latest_watermarks"]  # their home is watermarks.py


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
    run_id = context.run.run_id
    client, list_id = registry.client_for_partition(partition)
    try:  # both accounts' keys, before any request: a bad Ometria key must not wait for the whole fetch
        keys = registry.credentials(client, list_id)
    except ApiError as exc:
        raise failure(exc) from None
    destination, (since, archived_since, _) = begin_sync(
        context, client, list_id, registry.registry, config.full_refresh, config.wait_for_other_runs_s
    )
    folder = storage.run_folder(partition, run_id)
    folder.pages.mkdir(parents=True, exist_ok=True)
    context.log.info(
        f"{partition}: {'full' if since is None else 'incremental'} sync of list {list_id}, "
        f"last_changed after {since.isoformat() if since else 'the beginning'}"
    )

    def writer(kind: str):
        def on_page(page: Page, pass_no: int) -> None:
            _write_atomic(folder.page(kind, pass_no, page.offset), gzip.compress(page.raw, compresslevel=1))

        return on_page

    last_log = [time.monotonic()]

    def on_progress(stats: FetchStats, pass_pages: int) -> None:
        if time.monotonic() - last_log[0] >= 10:
            last_log[0] = time.monotonic()
            context.log.info(
                f"{partition}: {stats.pages}/{pass_pages} pages "
                f"({stats.rows} rows, the pages' overlap included), {stats.calls} calls, {stats.retries} retries"
            )

    run_start = run_started_at(context.instance, run_id)
    try:
        # The members' first page is the probe: a revoked key or a deleted list fails on that one
        # request. Once it has answered, the archived sweep (usually a page or two) runs alongside
        # the remaining pages; both share the account's connections (one gate per account).
        with mailchimp.client(client, context.log, keys.mailchimp) as mc, ThreadPoolExecutor(1) as sweeps_pool:
            archived_future: list[Future[WindowFetch]] = []
            write_members = writer("members")

            def on_member_page(page: Page, pass_no: int) -> None:
                write_members(page, pass_no)
                # The first page is delivered on this thread before any other is fetched: no race.
                if mailchimp.sweep_archived and not archived_future:
                    archived_future.append(
                        sweeps_pool.submit(
                            mc.fetch_window,
                            list_id,
                            since=archived_since,
                            before_fallback=run_start,
                            status="archived",
                            on_page=writer("archived"),
                        )
                    )

            main = mc.fetch_window(
                list_id, since=since, before_fallback=run_start, on_page=on_member_page, on_progress=on_progress
            )
            archived = archived_future[0].result() if archived_future else None
    except ApiError as exc:
        raise failure(exc) from None
    window = Window(
        since=since,
        before=main.before,
        full_refresh=since is None,
        archived_since=archived_since,
        archived_before=archived.before if archived is not None else None,
    )
    sweeps = [main, *([archived] if archived else [])]
    calls = sum(f.stats.calls for f in sweeps)
    pages = sum(f.stats.pages for f in sweeps)
    retries = sum(f.stats.retries for f in sweeps)
    throttled = sum(f.stats.throttled for f in sweeps)
    causes: dict[str, int] = {}
    for f in sweeps:
        for cause, n in f.stats.causes.items():
            causes[cause] = causes.get(cause, 0) + n
    archived_members = archived.members if archived else 0
    rows = sum(f.rows for f in sweeps)
    overlap_rows = sum(f.overlap_rows for f in sweeps)
    seconds = sum(f.stats.seconds for f in sweeps)
    run = RunFiles(
        partition=partition,
        client_id=client.id,
        list_id=list_id,
        run_id=run_id,
        folder=str(folder.root),
        window=window,
        destination=destination,
        push_all=config.push_all,
    )
    context.log.info(
        f"{partition}: {main.members} members and {archived_members} archived ({rows} rows in {pages} pages, "
        f"{overlap_rows} of them the pages' overlap), window {window.describe()}, {calls} calls ({retries} retries, "
        f"{throttled} throttled) in {seconds:.1f}s"
    )
    return Output(
        PageSet(
            run=run,
            total_items=main.total_first,
            total_last=main.total_last,
            pages=pages,
            members=main.members,
            archived=archived_members,
            passes=main.passes,
        ),
        metadata={
            "window_since": MetadataValue.text(window.since.isoformat() if window.since else "(full sync)"),
            "window_before": MetadataValue.timestamp(window.before),
            "full_refresh": window.full_refresh,
            # Mailchimp's count of the window, at the first page and the smallest any page gave.
            "total_items": main.total_first,
            "total_items_at_end": main.total_last,
            "archived_total_items": archived.total_first if archived else 0,
            "archived_total_items_at_end": archived.total_last if archived else 0,
            "passes": main.passes,
            "archived_passes": archived.passes if archived else 0,
            "page_overlap": main.overlap,
            "pages": pages,
            # Distinct members read (window positions of the last pass), then rows as received.
            "members": main.members,
            "archived_members": archived_members,
            "rows_fetched": rows,
            "overlap_rows": overlap_rows,
            "api_calls": calls,
            "retries": retries,
            "throttled": throttled,
            "retry_causes": MetadataValue.json(causes),
            "bytes": sum(f.stats.bytes for f in sweeps),
            "seconds": round(seconds, 3),
            "folder": MetadataValue.path(str(folder.pages)),
        },
    )


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
    files = sorted(folder.pages.glob("*.json.gz"))
    if len(files) != pages.pages:
        raise Failure(
            description=f"{run.partition}: {len(files)} page files in {folder.pages}, expected {pages.pages}",
            allow_retries=False,
        )
    writer = StagingWriter(folder.members)
    try:
        for path in files:
            offset = int(path.name.removesuffix(".json.gz").rsplit("-", 1)[1])
            writer.write_page(gzip.decompress(path.read_bytes()), offset)
        summary = writer.close()
    except BaseException:
        writer.abort()
        raise
    dead = write_run_file(folder.root, "staging", summary.dead_letters)
    if summary.duplicates:
        context.log.info(
            f"{run.partition}: {summary.rows} members staged from {summary.rows_read + dead} rows: "
            f"{summary.overlap_duplicates} read twice by the pages' overlap, {summary.changed_duplicates} older "
            f"versions, {dead} dead letters"
        )
    if summary.changed_duplicates:
        context.log.warning(
            f"{run.partition}: {summary.changed_duplicates} older versions of members that changed while the list "
            "was paged (read again with another last_changed); kept the latest version of each"
        )
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
