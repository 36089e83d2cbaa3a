"""Raw Mailchimp pages -> the typed Parquet staging table, page by page.

Parsing is defensive: a member of the wrong shape or with wrong types never fails a run; it
becomes a null column value or, if it has no usable id, a dead letter with its reason. Memory
stays flat: rows go to Parquet in row groups, and de-duplication keeps only 16 bytes per member
(an id hash and its last_changed) until the end.

CPU matters here (a full sync of a large list stages every member): a well-formed page is parsed
column-wise by Arrow's JSON reader, and duplicates from the pages' overlap are dropped in memory
before a row group is written, so the file is written once (see benchmarks/, scenario 5).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
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

    A well-formed page (every member an object with an id, every field of its documented type)
    is parsed by Arrow's JSON reader straight into columns, with no Python object per member;
    any other page takes the member-by-member path below, which decides every odd case. Both
    give the same rows (see `_parse_page_arrow`).
    """
    table = _parse_page_arrow(raw, page_offset)
    if table is not None:
        return table, []
    return _parse_page_python(raw, page_offset)


def _parse_page_python(raw: bytes, page_offset: int) -> tuple[pa.Table, list[dict[str, Any]]]:
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
                # A plain dead-letter row (mc_pipeline.dead_letters gives it its schema), the member whole.
                payload = orjson.dumps(m, default=str).decode()
                dead.append(
                    {
                        "stage": "staging",
                        "member_id": None,
                        "record_id": None,
                        "reason": "member without an id",
                        "payload": payload,
                    }
                )
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


# ------------------------------------------------------------------------------ the columnar path
# The fields a well-formed member has, with their JSON types. Arrow's reader refuses a page where
# any of them has another type (a number for a string, an object for a list...), and the page
# then takes the Python path, so the columnar path never has to decide an odd case.
_MEMBER_JSON = pa.struct(
    [
        ("id", pa.string()),
        ("email_address", pa.string()),
        ("unique_email_id", pa.string()),
        ("contact_id", pa.string()),
        ("full_name", pa.string()),
        ("status", pa.string()),
        ("merge_fields", pa.struct([(k, pa.string()) for k in ("FNAME", "LNAME", "PHONE", "BIRTHDAY")])),
        ("timestamp_signup", pa.string()),
        ("timestamp_opt", pa.string()),
        ("last_changed", pa.string()),
        ("language", pa.string()),
        ("vip", pa.bool_()),
        ("member_rating", pa.int64()),
        ("location", pa.struct([("country_code", pa.string())])),
        ("source", pa.string()),
        ("tags", pa.list_(pa.struct([("name", pa.string())]))),
    ]
)
_JSON_PARSE = pajson.ParseOptions(
    explicit_schema=pa.schema([pa.field("members", pa.list_(_MEMBER_JSON))]),
    unexpected_field_behavior="ignore",
    newlines_in_values=True,
)
# Each member's merge_fields object, as sent: the text after `"merge_fields":`, up to its closing
# brace, objects nested at most once (ADDRESS), compact (no whitespace outside strings).
_STR = r'"(?:[^"\\]|\\.)*"'
_MERGE_SPAN = rf'^(?P<m>\{{(?:[^{{}}"\s]|{_STR}|\{{(?:[^{{}}"\s]|{_STR})*\}})*\}})'
# What orjson would write differently from the text as sent: escapes, and numbers it re-formats
# (a fraction or exponent, minus zero). A conservative test: a match only costs a re-encoding.
_NOT_CANONICAL = r"\\|[:,\[]-?[0-9]+[.eE]|[:,\[]-0[^0-9.eE]"
# ADDRESS is "" or an object (so Arrow cannot type it); its country is read from the text. In the
# object's text a key follows `{` or `,`, and a quote inside a string is escaped.
_ADDRESS = rf'"ADDRESS":(?P<a>\{{(?:[^{{}}"]|{_STR})*\}})'
_COUNTRY = rf'[{{,]"country":(?P<c>{_STR}|[^,}}]*)'


def read_page_json(raw: bytes) -> pa.Table:
    """The page read by Arrow's JSON reader with the members' documented types, in one block."""
    options = pajson.ReadOptions(use_threads=False, block_size=len(raw) + 64)
    return pajson.read_json(io.BytesIO(raw), read_options=options, parse_options=_JSON_PARSE)


def _parse_page_arrow(raw: bytes, page_offset: int) -> pa.Table | None:
    """The page as staged rows without a Python object per member, or None when the page needs
    the Python path: it does not parse with the documented types, a member has no id, a
    merge_fields object is missing or nested deeper than once, or a tag has no name.

    The rows equal the Python path's: merge_fields_json is the object's text as sent when that
    is what orjson would write (compact, no escapes, integers only), else orjson's re-encoding.
    (One difference: a merge field repeated within one object, which JSON allows and Mailchimp
    does not send, stays twice in the text; the record pushed is the same, as both parse to
    the last value.)
    """
    try:
        page = read_page_json(raw)
    except (pa.ArrowException, ValueError, TypeError):
        return None
    if page.num_rows != 1 or page.column("members").null_count:
        return None
    members = pc.list_flatten(page.column("members").combine_chunks())
    n = len(members)
    if members.null_count:
        return None

    fields = dict(zip(_MEMBER_JSON.names, members.flatten(), strict=True))
    merge = fields["merge_fields"]
    ids = fields["id"]
    if n and (ids.null_count or merge.null_count or pc.any(pc.equal(ids, "")).as_py()):
        return None
    tags = fields["tags"]
    tag_structs = pc.list_flatten(tags)
    names = pc.struct_field(tag_structs, "name") if len(tag_structs) else pa.array([], pa.string())
    if tag_structs.null_count or names.null_count:
        return None
    lengths = pc.fill_null(pc.list_value_length(tags), 0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    merge_json = _merge_fields_json(raw, n)
    if merge_json is None:
        return None
    merge_parts = dict(zip([f.name for f in merge.type], merge.flatten(), strict=True))
    rating = fields["member_rating"]
    rating = pc.if_else(pc.and_(pc.greater_equal(rating, -(2**15)), pc.less(rating, 2**15)), rating, None)
    columns = {
        "member_id": ids,
        "email_address": fields["email_address"],
        "unique_email_id": fields["unique_email_id"],
        "contact_id": fields["contact_id"],
        "full_name": fields["full_name"],
        "status": fields["status"],
        "fname": merge_parts["FNAME"],
        "lname": merge_parts["LNAME"],
        "phone": merge_parts["PHONE"],
        "birthday": merge_parts["BIRTHDAY"],
        "address_country": _address_country(merge_json),
        "merge_fields_json": merge_json,
        "timestamp_signup": _timestamp_strings(fields["timestamp_signup"]),
        "timestamp_opt": _timestamp_strings(fields["timestamp_opt"]),
        "last_changed": _timestamp_strings(fields["last_changed"]),
        "language": fields["language"],
        "vip": fields["vip"],
        "member_rating": rating.cast(pa.int16()),
        "country_code": pc.struct_field(fields["location"], "country_code"),
        "source": fields["source"],
        "tags": pa.ListArray.from_arrays(pa.array(offsets), names),
        "page_offset": pa.array(np.full(n, page_offset, dtype=np.int32)),
    }
    return pa.Table.from_pydict(columns, schema=STAGING_SCHEMA)


def _merge_fields_json(raw: bytes, n: int) -> pa.Array | None:
    """Each member's merge_fields as compact JSON, cut from the page's text in member order."""
    pieces = pc.list_flatten(pc.split_pattern(pa.array([raw], pa.binary()), pattern='"merge_fields":'))
    if len(pieces) != n + 1:  # a merge_fields key missing, or one that is not a member's
        return None
    spans = pc.struct_field(pc.extract_regex(pieces.slice(1), pattern=_MERGE_SPAN), "m")
    if spans.null_count:
        return None
    try:
        spans = spans.cast(pa.string())
    except pa.ArrowInvalid:
        return None
    redo = pc.match_substring_regex(spans, _NOT_CANONICAL)
    if pc.any(redo).as_py():
        texts = spans.to_pylist()
        try:
            for i in np.flatnonzero(redo.to_numpy(zero_copy_only=False)).tolist():
                texts[i] = orjson.dumps(orjson.loads(texts[i])).decode()
        except orjson.JSONDecodeError:
            return None
        spans = pa.array(texts, pa.string())
    return spans


def _address_country(merge_json: pa.Array) -> pa.Array:
    """ADDRESS.country as the Python path reads it: a string as is, a number as text, else null."""
    has = pc.match_substring(merge_json, '"ADDRESS":{')  # the regexes run only where they can match
    address = pc.struct_field(pc.extract_regex(merge_json.filter(has), pattern=_ADDRESS), "a")
    token = pc.struct_field(pc.extract_regex(address, pattern=_COUNTRY), "c")
    plain = pc.match_substring_regex(token, r'^"[^"\\]*"$')
    found = pc.if_else(plain, pc.utf8_slice_codeunits(token, 1, -1), pa.scalar(None, pa.string()))
    odd = pc.and_(pc.is_valid(token), pc.invert(pc.fill_null(plain, False)))
    if pc.any(odd).as_py():  # an escaped string or a number: decoded like the Python path does
        values, tokens = found.to_pylist(), token.to_pylist()
        for i in np.flatnonzero(odd.to_numpy(zero_copy_only=False)).tolist():
            try:
                values[i] = _clean_text(orjson.loads(tokens[i]))
            except orjson.JSONDecodeError:
                values[i] = None
        found = pa.array(values, pa.string())
    return pc.replace_with_mask(pa.nulls(len(merge_json), pa.string()), has, found)


def _timestamp_strings(strings: pa.Array) -> pa.Array:
    if pc.any(pc.ends_with(strings, "Z")).as_py():
        strings = pc.replace_substring_regex(strings, r"Z$", "+00:00")
    return pc.strptime(strings, format="%Y-%m-%dT%H:%M:%S%z", unit="ms", error_is_null=True).cast(UTC_TS)


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
