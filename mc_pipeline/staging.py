"""Raw Mailchimp pages -> the typed Parquet staging table, page by page.

Parsing is defensive: a member of the wrong shape or with wrong types never fails a run; it
becomes a null column value or, if it has no usable id, a dead letter with its reason. Memory
stays flat: rows go to Parquet in row groups, and de-duplication keeps only 16 bytes per member
(an id hash and its last_changed) until the end.

CPU matters here (a full sync of a large list stages every member): a page is parsed once, by
orjson, and its staged rows built column by column; duplicates from the pages' overlap are dropped
in memory before a row group is written, so the file is written once (see benchmarks/, scenario 5,
and benchmarks/parsers.py for the other readers measured).
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
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
_ROW_GROUP_ROWS = 50_000


def _clean_text(v: Any) -> str | None:
    """A string as sent; numbers as text; anything else (objects, lists, bools) as null."""
    return v if isinstance(v, str) else str(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _strings(values: Sequence[Any]) -> pa.Array:
    """The fast path takes well-formed values as they are; a wrong type anywhere cleans the column."""
    try:
        return pa.array(values, pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array([_clean_text(v) for v in values], pa.string())


def _typed(values: Sequence[Any], typ: pa.DataType, ok: Any) -> pa.Array:
    """Values of the column's JSON type as they are; a value of another one (a fraction or a bool
    for an integer, which Arrow's builder would take) or out of range cleans the column."""
    try:
        inferred = pa.array(values)
        if inferred.type in (typ, pa.null()) or (pa.types.is_integer(typ) and inferred.type == pa.int64()):
            return inferred.cast(typ)  # checked: out of range raises
    except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError):
        pass
    return pa.array([v if ok(v) else None for v in values], typ)


def _timestamps(values: Sequence[Any]) -> pa.Array:
    """ISO 8601 strings with offsets -> UTC milliseconds; `""`, null and garbage -> null."""
    strings = _strings(values)
    if pc.any(pc.ends_with(strings, "Z")).as_py():
        strings = pc.replace_substring_regex(strings, r"Z$", "+00:00")
    return pc.strptime(strings, format="%Y-%m-%dT%H:%M:%S%z", unit="ms", error_is_null=True).cast(UTC_TS)


def _tag_names(values: Sequence[Any]) -> pa.Array:
    try:
        tags = pa.array(values, _TAGS)  # a tag's other keys are left out
        names = tags.values.field("name")
        if not (tags.values.null_count or names.null_count):
            return pa.ListArray.from_arrays(tags.offsets, names)  # a null list of tags: none
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    return pa.array(
        [
            [t["name"] for t in ts if isinstance(t, dict) and isinstance(t.get("name"), str)]
            if isinstance(ts, list)
            else []
            for ts in values
        ],
        pa.list_(pa.string()),
    )


def _dicts(values: Iterable[Any]) -> list[dict[str, Any]]:
    return [v if type(v) is dict else {} for v in values]


def _transposed(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Sequence[Any]]:
    """Each key's values over the rows (None where a row lacks it), in one pass when every row
    has every key, as in a page as sent: a third of the cost of one `dict.get` pass per key."""
    if not rows:
        return {k: [] for k in keys}
    try:
        return dict(zip(keys, zip(*map(itemgetter(*keys), rows), strict=True), strict=True))
    except KeyError:
        get = dict.get
        return {k: [get(r, k) for r in rows] for k in keys}


_TEXT = ("email_address", "unique_email_id", "contact_id", "full_name", "status", "language", "source")
_TIMES = ("timestamp_signup", "timestamp_opt", "last_changed")
_MEMBER_KEYS = ("id", *_TEXT, *_TIMES, "vip", "member_rating", "merge_fields", "location", "tags")
_MERGE_KEYS = {"fname": "FNAME", "lname": "LNAME", "phone": "PHONE", "birthday": "BIRTHDAY"}
_TAGS = pa.list_(pa.struct([("name", pa.string())]))
# A plain dead-letter row (mc_pipeline.dead_letters gives it its schema); the member goes whole as its payload.
_NO_ID = {"stage": "staging", "member_id": None, "record_id": None, "reason": "member without an id"}


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a page's objects are built.

    A page of 1,000 members is some 30,000 dicts, lists and strings, whose allocation sets off
    collections that walk every live object: measured, they cost as much as the JSON parse itself
    (benchmarks/parsers.py). A page holds no cycles; reference counting frees it all the same.
    (Two threads pausing it at once may bring it back early: that only costs time.)
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_page(raw: bytes, page_offset: int = 0) -> tuple[pa.Table, list[dict[str, Any]]]:
    """One raw page -> (staged rows, dead letters): orjson parses it, each column is built at once.

    Raises ValueError only if the page itself is not a members page (the fetcher has already
    retried such pages). A member that is not an object or has no id is a dead letter; a field
    of the wrong type is null. Nothing about one member can fail the page. Each column tries
    Arrow's builder on the values as sent and is cleaned value by value only when one has the
    wrong type, so a well-formed page costs one parse and one pass per column.
    """
    with _collector_paused():
        doc = orjson.loads(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("members"), list):
            raise ValueError(f"page at offset {page_offset} has no 'members' list")
        members, dead = _with_ids(doc["members"])
        table = _columns(members, page_offset)
        del doc, members  # freed before the collector is back, else its first pass walks them all
    return table, dead


def _with_ids(members: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The members that are objects with an id, and a dead letter for each other one."""
    has_id = [type(m) is dict and type(m.get("id")) is str and m["id"] != "" for m in members]
    if all(has_id):
        return members, []
    pairs = list(zip(members, has_id, strict=True))
    dead = [{**_NO_ID, "payload": orjson.dumps(m).decode()} for m, ok in pairs if not ok]
    return [m for m, ok in pairs if ok], dead


def _columns(members: list[dict[str, Any]], page_offset: int) -> pa.Table:
    m = _transposed(members, _MEMBER_KEYS)
    merges = _dicts(m["merge_fields"])
    merge = _transposed(merges, (*_MERGE_KEYS.values(), "ADDRESS"))
    get = dict.get
    columns = {
        "member_id": _strings(m["id"]),
        **{name: _strings(m[name]) for name in _TEXT},
        **{name: _strings(merge[key]) for name, key in _MERGE_KEYS.items()},
        "address_country": _strings([get(a, "country") for a in _dicts(merge["ADDRESS"])]),
        # Compact, as the transform's patterns expect (see transform.properties_json).
        "merge_fields_json": pa.array(list(map(orjson.dumps, merges)), pa.binary()).view(pa.string()),  # UTF-8
        **{name: _timestamps(m[name]) for name in _TIMES},
        "vip": _typed(m["vip"], pa.bool_(), lambda v: isinstance(v, bool)),
        "member_rating": _typed(
            m["member_rating"],
            pa.int16(),
            lambda v: isinstance(v, int) and not isinstance(v, bool) and -(2**15) <= v < 2**15,
        ),
        "country_code": _strings([get(loc, "country_code") for loc in _dicts(m["location"])]),
        "tags": _tag_names(m["tags"]),
        "page_offset": pa.array(np.full(len(members), page_offset, dtype=np.int32)),
    }
    return pa.Table.from_pydict(columns, schema=STAGING_SCHEMA)


_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = _i + 10


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it permutes the 64-bit integers


def id_keys(member_ids: pa.Array) -> np.ndarray:
    """64-bit keys of member ids: the MD5's two halves folded, vectorised; a hash otherwise."""
    if isinstance(member_ids, pa.ChunkedArray):
        member_ids = member_ids.combine_chunks()
    n = len(member_ids)
    if n and not member_ids.null_count and pc.all(pc.equal(pc.binary_length(member_ids), 32)).as_py():
        # Every id is 32 characters, so they lie back to back in the data buffer: decode it whole.
        offsets = np.frombuffer(member_ids.buffers()[1], dtype=np.int32)[member_ids.offset :]
        data = np.frombuffer(member_ids.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[0] + 32 * n]
        nibbles = _HEX[data].reshape(n, 32)
        if not (nibbles == 255).any():  # else not hex: hash instead
            digest = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
            halves = np.ascontiguousarray(digest).view(">u8")
            # An asymmetric fold: with a plain XOR, every id whose halves are equal would map to 0.
            with np.errstate(over="ignore"):
                return (halves[:, 0].astype(np.uint64) * _GOLDEN) ^ halves[:, 1].astype(np.uint64)
    return np.array(
        [int.from_bytes(hashlib.blake2b(x.encode(), digest_size=8).digest(), "big") for x in member_ids.to_pylist()],
        dtype=np.uint64,
    )


def _keep_latest(keys: np.ndarray, changed: np.ndarray, ids_of: Any) -> tuple[np.ndarray, int] | None:
    """(keep-mask over rows, older versions dropped) if any member appears twice (the latest
    last_changed wins; on a tie, the later row, i.e. a later page), else None. A member's rows
    with one last_changed are one version read again (the pages' overlap); each further
    last_changed is an older version of a member that changed during the sync.

    64-bit keys find the candidates cheaply; `ids_of(rows)` gives the full ids of those few rows,
    which decide, so a key collision between two different members can never drop one of them.
    """
    uniq, counts = np.unique(keys, return_counts=True)
    if len(uniq) == len(keys):
        return None
    candidates = np.flatnonzero(np.isin(keys, uniq[counts > 1]))
    rows_ids = list(zip(candidates.tolist(), ids_of(candidates), strict=True))
    best: dict[str, int] = {}
    versions: dict[str, set[int]] = {}
    for row, mid in rows_ids:
        versions.setdefault(mid, set()).add(int(changed[row]))
        other = best.get(mid)
        if other is None or (changed[row], row) >= (changed[other], other):
            best[mid] = row
    keep = np.ones(len(keys), dtype=bool)
    keep[candidates] = False
    keep[list(best.values())] = True
    if keep.all():
        return None
    return keep, sum(len(v) - 1 for v in versions.values())


@dataclass
class StagingSummary:
    """What became of every row read from the pages: staged, or dropped as a duplicate of one of two kinds."""

    rows: int  # distinct members staged: what the file holds
    rows_read: int  # rows parsed from the pages (members without an id are dead letters, not rows)
    overlap_duplicates: int  # the same member with the same last_changed read again (the pages' overlap)
    changed_duplicates: int  # an older version of a member that changed while the list was paged
    dead_letters: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return self.overlap_duplicates + self.changed_duplicates


class StagingWriter:
    """Appends pages to one Parquet file; duplicate members are removed (latest wins).

    Pages are buffered up to a row group and de-duplicated there before they are written; the
    newest page stays in the buffer, so the members it shares with the next page (pages overlap)
    are resolved in memory too. Only a duplicate across row groups that were already written (a
    list that changed a lot while it was paged, a second pass) makes `close()` rewrite the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_suffix(".parquet.partial")
        self._writer = pq.ParquetWriter(self._tmp, STAGING_SCHEMA, compression="zstd")
        self._pages: list[tuple[pa.Table, np.ndarray, np.ndarray]] = []  # buffered: rows, keys, last_changed
        self._buffered = 0
        self._keys: list[np.ndarray] = []  # of the rows written
        self._changed: list[np.ndarray] = []
        self._dropped = 0  # duplicates removed before writing
        self._changed_dropped = 0  # of which older versions (another last_changed)
        self.rows = 0
        self.dead_letters: list[dict[str, Any]] = []

    def write_page(self, raw: bytes, page_offset: int) -> int:
        table, dead = parse_page(raw, page_offset)
        self.dead_letters.extend(dead)
        if table.num_rows:
            keys = id_keys(table.column("member_id"))
            changed = table.column("last_changed").cast(pa.int64()).fill_null(-1).to_numpy()
            self._pages.append((table, keys, changed))
            self._buffered += table.num_rows
            self.rows += table.num_rows
            if self._buffered - table.num_rows >= _ROW_GROUP_ROWS:
                self._flush(hold_last=True)
        return table.num_rows

    def _flush(self, hold_last: bool) -> None:
        """De-duplicate the buffer, then write it (but its newest page, with `hold_last`)."""
        if not self._pages:
            return
        keys = np.concatenate([k for _, k, _ in self._pages])
        changed = np.concatenate([c for _, _, c in self._pages])
        tables = [t for t, _, _ in self._pages]
        found = _keep_latest(
            keys, changed, lambda rows: pa.concat_tables(tables).column("member_id").take(pa.array(rows)).to_pylist()
        )
        if found is not None:
            keep, changed_dropped = found
            self._changed_dropped += changed_dropped
            start, pages = 0, []
            for table, k, c in self._pages:
                mask = keep[start : start + table.num_rows]
                start += table.num_rows
                if not mask.all():
                    self._dropped += int((~mask).sum())
                    table, k, c = table.filter(pa.array(mask)), k[mask], c[mask]
                pages.append((table, k, c))
            self._pages = pages
        held = self._pages[-1:] if hold_last else []
        out = self._pages[:-1] if hold_last else self._pages
        if out:
            self._writer.write_table(pa.concat_tables([t for t, _, _ in out]))
            self._keys.extend(k for _, k, _ in out)
            self._changed.extend(c for _, _, c in out)
        self._pages = held
        self._buffered = sum(t.num_rows for t, _, _ in held)

    def close(self) -> StagingSummary:
        self._flush(hold_last=False)
        self._writer.close()
        winners = self._winners()
        dropped, changed_dropped = self._dropped, self._changed_dropped
        if winners is None:
            self._tmp.replace(self.path)
        else:  # rewrite without the losers, one row group at a time
            keep, late_changed = winners
            source = pq.ParquetFile(self._tmp)
            with pq.ParquetWriter(self.path, STAGING_SCHEMA, compression="zstd") as out:
                start = 0
                for i in range(source.num_row_groups):
                    group = source.read_row_group(i)
                    mask = keep[start : start + group.num_rows]
                    start += group.num_rows
                    out.write_table(group.filter(pa.array(mask)).cast(STAGING_SCHEMA))
            self._tmp.unlink()
            dropped += int((~keep).sum())
            changed_dropped += late_changed
        read, self.rows = self.rows, pq.ParquetFile(self.path).metadata.num_rows
        return StagingSummary(self.rows, read, dropped - changed_dropped, changed_dropped, self.dead_letters)

    def _winners(self) -> tuple[np.ndarray, int] | None:
        """`_keep_latest` over the rows written if a member is in two row groups, else None (usual)."""
        if not self._keys:
            return None
        keys = np.concatenate(self._keys)
        changed = np.concatenate(self._changed)

        def ids_of(rows: np.ndarray) -> list[str]:
            column = pq.read_table(self._tmp, columns=["member_id"]).column(0)
            return column.take(pa.array(rows)).to_pylist()

        return _keep_latest(keys, changed, ids_of)

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)
