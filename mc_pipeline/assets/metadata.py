"""What the UI shows of an output: a Parquet file's schema, row count, URI and masked preview; a fetch's counts."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import MetadataValue, TableColumn, TableSchema

from mc_pipeline.assets.models import PageSet, RunFiles, Window
from mc_pipeline.assets.watermarks import LIST_MEMBERS, LIST_NAME
from mc_pipeline.resources.paging import MEMBER_FIELDS, FetchResult

PREVIEW_ROWS = 5
_PII = frozenset(
    {
        "email_address",
        "email",
        "full_name",
        "fname",
        "lname",
        "firstname",
        "lastname",
        "phone",
        "phone_number",
        "merge_fields_json",
        "properties_json",
        "payload",
    }
)


def table_schema(schema: pa.Schema) -> TableSchema:
    return TableSchema(
        columns=[
            TableColumn(
                name=f.name,
                type=str(f.type),
                description=(f.metadata or {}).get(b"doc", b"").decode() or None,
            )
            for f in schema
        ]
    )


def mask(value: Any) -> str:
    """Enough to recognise a row, not enough to leak a person: `ol***@example.org`, `Jo***`."""
    if value is None:
        return ""
    text = str(value)
    if "@" in text and len(text) < 320:
        local, _, domain = text.partition("@")
        return f"{local[:2]}***@{domain}"
    return f"{text[:2]}***" if len(text) > 2 else "***"


def preview(path: Path, columns: list[str] | None = None) -> MetadataValue:
    """A markdown table of the first rows, personal data masked."""
    pf = pq.ParquetFile(path)
    if pf.metadata.num_rows == 0:
        return MetadataValue.md("_no rows_")
    batch = next(pf.iter_batches(batch_size=PREVIEW_ROWS, columns=columns))
    names = batch.schema.names
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in batch.to_pylist():
        cells = []
        for name in names:
            v = row[name]
            if name in _PII:
                v = mask(v)
            elif isinstance(v, datetime):
                v = v.isoformat()
            elif isinstance(v, list):
                v = ", ".join(map(str, v))
            cells.append(str(v if v is not None else "").replace("|", "\\|").replace("\n", " ")[:60])
        lines.append("| " + " | ".join(cells) + " |")
    return MetadataValue.md("\n".join(lines))


def human_bytes(n: int) -> str:
    """`1536` -> `1.5 KiB`: the size an operator reads; the exact count stays beside it."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def size_metadata(n: int) -> dict[str, MetadataValue]:
    return {"bytes": MetadataValue.int(n), "bytes_human": MetadataValue.text(human_bytes(n))}


def window_metadata(window: Window) -> dict[str, MetadataValue]:
    """The window as timestamps; a full sync has no lower bound, so no `window_since` (and says so)."""
    since = {"window_since": MetadataValue.timestamp(window.since)} if window.since else {}
    return {
        **since,
        "window_before": MetadataValue.timestamp(window.before),
        "window": MetadataValue.text("full sync" if window.since is None else "incremental"),
    }


def parquet_metadata(path: Path, schema: pa.Schema, rows: int, preview_columns: list[str] | None = None) -> dict:
    return {
        "dagster/row_count": rows,
        "dagster/column_schema": table_schema(schema),
        "dagster/uri": MetadataValue.path(str(path)),
        **size_metadata(path.stat().st_size if path.exists() else 0),
        "preview": preview(path, preview_columns),
    }


# --------------------------------------------------------------------------- mailchimp/member_pages
# What a page file holds per member: the fields the client asks for (MEMBER_FIELDS), as Mailchimp sent them.
PAGE_SCHEMA = TableSchema(
    columns=[TableColumn(name=f, type="json", description="as Mailchimp sent it") for f in MEMBER_FIELDS]
)


def fetched_window(fetched: FetchResult, archived_since: datetime | None) -> Window:
    """The window a fetch covered; without an archived sweep its watermark is carried forward."""
    members, archived = fetched.members, fetched.archived
    return Window(
        since=members.since,
        before=members.before,
        full_refresh=members.since is None,
        archived_since=archived.since if archived is not None else archived_since,
        archived_before=archived.before if archived is not None else None,
    )


def page_set(run: RunFiles, fetched: FetchResult) -> PageSet:
    """What member_pages hands on: the members' counts (the archived ones counted apart) and every page."""
    main = fetched.members
    return PageSet(
        run=run,
        total_items=main.total_first,
        total_last=main.total_last,
        pages=fetched.total("pages"),
        members=main.members,
        archived=fetched.archived.members if fetched.archived else 0,
        passes=main.passes,
    )


def fetch_summary(partition: str, fetched: FetchResult, window: Window) -> str:
    archived = fetched.archived.members if fetched.archived else 0
    total = fetched.total
    return (
        f"{partition}: {fetched.members.members} members and {archived} archived ({total('rows')} rows in "
        f"{total('pages')} pages, {fetched.overlap_rows} of them the pages' overlap), window {window.describe()}, "
        f"{total('calls')} calls ({total('retries')} retries, {total('throttled')} throttled) in {fetched.seconds:.1f}s"
    )


def pages_metadata(
    fetched: FetchResult, window: Window, folder: Path, list_name: str, list_members: int | None
) -> dict[str, Any]:
    """`list_members`: the list's size for the next full sync (`watermarks.list_history`)."""
    main, archived, total = fetched.members, fetched.archived, fetched.total
    return {
        LIST_NAME: MetadataValue.text(list_name),
        **({LIST_MEMBERS: MetadataValue.int(list_members)} if list_members is not None else {}),
        "dagster/row_count": total("rows"),  # rows in the page files, the overlap's included
        **window_metadata(window),
        "full_refresh": window.full_refresh,
        # Mailchimp's count of the window, at the first page and the smallest any page gave.
        "total_items": main.total_first,
        "total_items_at_end": main.total_last,
        "archived_total_items": archived.total_first if archived else 0,
        "archived_total_items_at_end": archived.total_last if archived else 0,
        "passes": main.passes,
        "archived_passes": archived.passes if archived else 0,
        "page_overlap": main.overlap,
        "pages": total("pages"),
        # Distinct members read (window positions of the last pass), then rows as received.
        "members": main.members,
        "archived_members": archived.members if archived else 0,
        "rows_fetched": total("rows"),
        "overlap_rows": fetched.overlap_rows,
        "api_calls": total("calls"),
        "retries": total("retries"),
        "throttled": total("throttled"),
        "retry_causes": MetadataValue.json(fetched.causes),
        **size_metadata(total("bytes")),
        "seconds": round(fetched.seconds, 3),
        "folder": MetadataValue.path(str(folder)),
    }
