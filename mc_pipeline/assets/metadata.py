"""What the UI shows of a Parquet output: schema, row count, URI and a masked preview."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import MetadataValue, TableColumn, TableSchema

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


def parquet_metadata(path: Path, schema: pa.Schema, rows: int, preview_columns: list[str] | None = None) -> dict:
    return {
        "dagster/row_count": rows,
        "dagster/column_schema": table_schema(schema),
        "dagster/uri": MetadataValue.path(str(path)),
        "bytes": path.stat().st_size if path.exists() else 0,
        "preview": preview(path, preview_columns),
    }
