"""Raw Mailchimp pages -> the typed Parquet staging table, page by page.

Parsing is defensive: a member of the wrong shape or with wrong types never fails a run; it
becomes a null column value or, if it has no usable id, a dead letter with its reason. Memory
stays flat: rows go to Parquet in row groups, and de-duplication keeps only 16 bytes per member
(an id hash and its last_changed) until the end.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Milliseconds: Parquet has no second unit, and a file must read back with the schema it was written with.
UTC_TS = pa.timestamp("ms", tz="UTC")
STAGING_SCHEMA = pa.schema(
    [
        pa.field("member_id", pa.string(), nullable=False, metadata={"doc": "MD5 of the lower-cased email"}),
        pa.field("email_address", pa.string()),
        pa.field("unique_email_id", pa.string()),
        pa.field("contact_id", pa.string()),
        pa.field("full_name", pa.string()),
        pa.field("status", pa.string()),
        pa.field("fname", pa.string()),
        pa.field("lname", pa.string()),
        pa.field("phone", pa.string()),
        pa.field("birthday", pa.string()),
        pa.field("address_country", pa.string()),
        pa.field("merge_fields_json", pa.string(), metadata={"doc": "every merge field, as compact JSON"}),
        pa.field("timestamp_signup", UTC_TS),
        pa.field("timestamp_opt", UTC_TS),
        pa.field("last_changed", UTC_TS),
        pa.field("language", pa.string()),
        pa.field("vip", pa.bool_()),
        pa.field("member_rating", pa.int16()),
        pa.field("country_code", pa.string()),
        pa.field("source", pa.string()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("page_offset", pa.int32()),
    ]
)
DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string()),  # "staging", "transform" or "import"
        pa.field("member_id", pa.string()),
        pa.field("record_id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("payload", pa.string()),  # the member or record as JSON, cut at 4 KB
    ]
)
_ROW_GROUP_ROWS = 50_000


def _clean_text(v: Any) -> str | None:
    """A string as sent; numbers as text; anything else (objects, lists, bools) as null."""
    if isinstance(v, str):
        return v
    if isinstance(v, int | float) and not isinstance(v, bool):
        return str(v)
    return None


def _strings(values: list[Any]) -> pa.Array:
    """The fast path takes well-formed values as they are; a wrong type anywhere cleans the column."""
    try:
        return pa.array(values, pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array([_clean_text(v) for v in values], pa.string())


def _typed(values: list[Any], typ: pa.DataType, ok: Any) -> pa.Array:
    try:
        return pa.array(values, typ)
    except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError):
        return pa.array([v if ok(v) else None for v in values], typ)


def _timestamps(values: list[Any]) -> pa.Array:
    """ISO 8601 strings with offsets -> UTC seconds; `""`, null and garbage -> null."""
    strings = _strings(values)
    strings = pc.replace_substring_regex(strings, r"Z$", "+00:00")
    return pc.strptime(strings, format="%Y-%m-%dT%H:%M:%S%z", unit="ms", error_is_null=True).cast(UTC_TS)


def _tag_names(values: list[Any]) -> pa.Array:
    try:
        return pa.array([[t["name"] for t in ts] if ts else [] for ts in values], pa.list_(pa.string()))
    except (TypeError, KeyError, pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array(
            [
                [t["name"] for t in ts if isinstance(t, dict) and isinstance(t.get("name"), str)]
                if isinstance(ts, list)
                else []
                for ts in values
            ],
            pa.list_(pa.string()),
        )


def _dicts(values: list[Any]) -> list[dict[str, Any]]:
    return [v if type(v) is dict else {} for v in values]


def parse_page(raw: bytes, page_offset: int = 0) -> tuple[pa.Table, list[dict[str, Any]]]:
    """One raw page -> (staged rows, dead letters), column by column.

    Raises ValueError only if the page itself is not a members page (the fetcher has already
    retried such pages). A member that is not an object or has no id is a dead letter; a field
    of the wrong type is null. Nothing about one member can fail the page.
    """
    doc = orjson.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("members"), list):
        raise ValueError(f"page at offset {page_offset} has no 'members' list")
    members = doc["members"]
    dead: list[dict[str, Any]] = []
    if not all(type(m) is dict and type(m.get("id")) is str and m["id"] for m in members):
        ok = []
        for m in members:
            if type(m) is dict and type(m.get("id")) is str and m["id"]:
                ok.append(m)
            else:
                dead.append(dead_letter("staging", None, None, "member without an id", m))
        members = ok
    get = dict.get
    merges = _dicts([get(m, "merge_fields") for m in members])
    locations = _dicts([get(m, "location") for m in members])
    addresses = _dicts([get(x, "ADDRESS") for x in merges])
    dumps = orjson.dumps
    columns = {
        "member_id": _strings([m["id"] for m in members]),
        "email_address": _strings([get(m, "email_address") for m in members]),
        "unique_email_id": _strings([get(m, "unique_email_id") for m in members]),
        "contact_id": _strings([get(m, "contact_id") for m in members]),
        "full_name": _strings([get(m, "full_name") for m in members]),
        "status": _strings([get(m, "status") for m in members]),
        "fname": _strings([get(x, "FNAME") for x in merges]),
        "lname": _strings([get(x, "LNAME") for x in merges]),
        "phone": _strings([get(x, "PHONE") for x in merges]),
        "birthday": _strings([get(x, "BIRTHDAY") for x in merges]),
        "address_country": _strings([get(a, "country") for a in addresses]),
        "merge_fields_json": pa.array([dumps(x) for x in merges], pa.binary()).cast(pa.string()),
        "timestamp_signup": _timestamps([get(m, "timestamp_signup") for m in members]),
        "timestamp_opt": _timestamps([get(m, "timestamp_opt") for m in members]),
        "last_changed": _timestamps([get(m, "last_changed") for m in members]),
        "language": _strings([get(m, "language") for m in members]),
        "vip": _typed([get(m, "vip") for m in members], pa.bool_(), lambda v: isinstance(v, bool)),
        "member_rating": _typed(
            [get(m, "member_rating") for m in members],
            pa.int16(),
            lambda v: isinstance(v, int) and not isinstance(v, bool) and -(2**15) <= v < 2**15,
        ),
        "country_code": _strings([get(loc, "country_code") for loc in locations]),
        "source": _strings([get(m, "source") for m in members]),
        "tags": _tag_names([get(m, "tags") for m in members]),
        "page_offset": pa.array([page_offset] * len(members), pa.int32()),
    }
    return pa.Table.from_pydict(columns, schema=STAGING_SCHEMA), dead


_EMAIL_IN_TEXT = re.compile(r"[^\s'\"<>]+@[^\s'\"<>]+")


def dead_letter(stage: str, member_id: str | None, record_id: str | None, reason: str, payload: Any) -> dict[str, Any]:
    """A dead letter; an address quoted in the reason (Ometria's messages quote them) is replaced
    by <email>, so reasons group and no address shows in metadata or logs."""
    reason = _EMAIL_IN_TEXT.sub("<email>", reason)
    try:
        text = orjson.dumps(payload, default=str).decode()
    except TypeError:
        text = repr(payload)
    return {"stage": stage, "member_id": member_id, "record_id": record_id, "reason": reason, "payload": text[:4096]}


def id_keys(member_ids: pa.Array) -> np.ndarray:
    """64-bit keys of member ids: the two halves of the MD5 XORed, vectorised; a hash otherwise."""
    ids = member_ids.to_pylist()
    if len(ids) and pc.all(pc.equal(pc.binary_length(member_ids), 32)).as_py():
        try:
            halves = np.frombuffer(bytes.fromhex("".join(ids)), dtype=">u8")
            return (halves[::2] ^ halves[1::2]).astype(np.uint64)
        except ValueError:
            pass  # not hex: hash instead
    return np.array(
        [int.from_bytes(hashlib.blake2b(x.encode(), digest_size=8).digest(), "big") for x in ids], dtype=np.uint64
    )


@dataclass
class StagingSummary:
    rows: int
    duplicates: int
    dead_letters: list[dict[str, Any]] = field(default_factory=list)


class StagingWriter:
    """Appends pages to one Parquet file; `close()` removes duplicate members (latest wins)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_suffix(".parquet.partial")
        self._writer = pq.ParquetWriter(self._tmp, STAGING_SCHEMA, compression="zstd")
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._keys: list[np.ndarray] = []
        self._changed: list[np.ndarray] = []
        self.rows = 0
        self.dead_letters: list[dict[str, Any]] = []

    def write_page(self, raw: bytes, page_offset: int) -> int:
        table, dead = parse_page(raw, page_offset)
        self.dead_letters.extend(dead)
        if table.num_rows:
            self._keys.append(id_keys(table.column("member_id").combine_chunks()))
            lc = table.column("last_changed").cast(pa.int64()).fill_null(-1)
            self._changed.append(lc.to_numpy())
            self._buffer.append(table)
            self._buffered += table.num_rows
            self.rows += table.num_rows
            if self._buffered >= _ROW_GROUP_ROWS:
                self._flush()
        return table.num_rows

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.concat_tables(self._buffer))
            self._buffer, self._buffered = [], 0

    def close(self) -> StagingSummary:
        self._flush()
        self._writer.close()
        keep = self._winners()
        if keep is None:
            self._tmp.replace(self.path)
            return StagingSummary(self.rows, 0, self.dead_letters)
        # Rewrite without the losers, one row group at a time.
        source = pq.ParquetFile(self._tmp)
        with pq.ParquetWriter(self.path, STAGING_SCHEMA, compression="zstd") as out:
            start = 0
            for i in range(source.num_row_groups):
                group = source.read_row_group(i)
                mask = keep[start : start + group.num_rows]
                start += group.num_rows
                out.write_table(group.filter(pa.array(mask)).cast(STAGING_SCHEMA))
        self._tmp.unlink()
        kept = int(keep.sum())
        duplicates = self.rows - kept
        self.rows = kept
        return StagingSummary(kept, duplicates, self.dead_letters)

    def _winners(self) -> np.ndarray | None:
        """A keep-mask over all rows if any member appears twice, else None (the usual case).

        64-bit keys find the candidates cheaply; the full ids of those few rows decide, so a key
        collision between two different members can never drop one of them.
        """
        if not self._keys:
            return None
        keys = np.concatenate(self._keys)
        uniq, counts = np.unique(keys, return_counts=True)
        if len(uniq) == len(keys):
            return None
        candidates = np.flatnonzero(np.isin(keys, uniq[counts > 1]))
        ids = pq.read_table(self._tmp, columns=["member_id"]).column(0).take(pa.array(candidates)).to_pylist()
        changed = np.concatenate(self._changed)
        best: dict[str, int] = {}
        for row, mid in zip(candidates.tolist(), ids, strict=True):
            other = best.get(mid)
            # the latest last_changed wins; on a tie, the later row (a later page)
            if other is None or (changed[row], row) >= (changed[other], other):
                best[mid] = row
        keep = np.ones(len(keys), dtype=bool)
        keep[candidates] = False
        keep[list(best.values())] = True
        return keep if not keep.all() else None

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)
