"""Page parsers measured against each other on the same pages, in one process: `python -m benchmarks.parsers`.

Each alternative runs the chain of scenario 5 (benchmarks/workers.py, `task_transform_cpu`): raw
pages -> staged rows (StagingWriter: parse, de-duplication, Parquet) -> Ometria records
(`to_contacts` on each row group read back), process CPU time in one thread. The alternatives
alternate round by round and the best round of each counts, so load from other processes on the
machine touches all of them alike; compare the ratios, not the absolute figures.

Pages come from the sandbox's generator with the pipeline's fields projection, overlapping by 20
members as the fetcher's pages do. Polars and DuckDB are needed only here:
`pip install polars duckdb` (an alternative whose package is missing is skipped).

Measured 2026-12-01 (100 pages, 98,020 members, best of 6; members/s per core, whole chain):
orjson + Arrow builders with the collector paused (kept) 77,146; the two parsers before 72,440;
their per-member parser alone, collector running, 57,253; Polars, typed fields only (it cannot
give merge_fields_json) 105,802; DuckDB, gzipped pages -> Parquet, one thread, 19,814; no parser
at all 169,813 (the rest of the chain's ceiling). Reading alone: Arrow 364,249, orjson 419,512.
So no parser reaches 150,000/s here: the writer and to_contacts leave under 1 us per member to parse.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from benchmarks.scenarios import baseline_modules
from benchmarks.workers import _load, staging_chain
from mc_pipeline import staging, transform

REPO = Path(__file__).resolve().parent.parent
# The two parsers side by side (Arrow's JSON reader + regexes, and the per-member fallback).
TWO_PARSERS_REV = "2c95e67"
COLLECTION = "mailchimp-0123456789"
Parse = Callable[[bytes, int], tuple[pa.Table, list[dict[str, Any]]]]

# The members' documented fields, typed for a reader that needs a schema (Arrow's, Polars').
MEMBER_JSON = pa.struct(
    [
        *[(k, pa.string()) for k in ("id", "email_address", "unique_email_id", "contact_id", "full_name", "status")],
        ("merge_fields", pa.struct([(k, pa.string()) for k in ("FNAME", "LNAME", "PHONE", "BIRTHDAY")])),
        *[(k, pa.string()) for k in ("timestamp_signup", "timestamp_opt", "last_changed", "language")],
        ("vip", pa.bool_()),
        ("member_rating", pa.int64()),
        ("location", pa.struct([("country_code", pa.string())])),
        ("source", pa.string()),
        ("tags", pa.list_(pa.struct([("name", pa.string())]))),
    ]
)
_JSON_PARSE = pajson.ParseOptions(
    explicit_schema=pa.schema([pa.field("members", pa.list_(MEMBER_JSON))]),
    unexpected_field_behavior="ignore",
    newlines_in_values=True,
)


def read_page_json(raw: bytes) -> pa.Table:
    """The page read by Arrow's JSON reader with the members' documented types, in one block:
    the floor of scenario 5 (figure 5b), what no Arrow-based parser can go below."""
    options = pajson.ReadOptions(use_threads=False, block_size=len(raw) + 64)
    return pajson.read_json(io.BytesIO(raw), read_options=options, parse_options=_JSON_PARSE)


def make_pages(n_pages: int, seed: int = 42) -> list[tuple[int, bytes]]:
    """(offset, raw page) as the sandbox serves them: 1,000 members a page, 20 shared with the next."""
    from mc_pipeline.resources.paging import MEMBER_FIELDS
    from mc_pipeline.sandbox.fields import parse_paths, project
    from mc_pipeline.sandbox.generate import MemberFactory

    factory = MemberFactory(seed, "0123456789", "us6", 1_790_000_000)
    tree = parse_paths(",".join(MEMBER_FIELDS))
    total = n_pages * 980 + 20
    members = [orjson.dumps(project(factory.make(i), tree, None)) for i in range(total)]
    return [
        (p * 980, b'{"members":[' + b",".join(members[p * 980 : p * 980 + 1000]) + b'],"total_items":%d}' % total)
        for p in range(n_pages)
    ]


def two_parsers() -> ModuleType | None:
    """staging.py as it was with two parsers (from git), to measure in the same run."""
    paths = baseline_modules(Path(tempfile.mkdtemp(prefix="bench-parsers-")), TWO_PARSERS_REV, ("staging",))
    return _load("two_parsers_staging", paths["staging"], "") if paths else None


def chain(parse: Parse, pages: list[tuple[int, bytes]], tmp: Path) -> dict[str, Any]:
    """Scenario 5's chain with `parse` in StagingWriter's place of parse_page."""
    original = staging.parse_page
    staging.parse_page = parse  # type: ignore[assignment]  # the writer calls the module's parse_page
    try:
        return staging_chain(staging, transform, pages, tmp)
    finally:
        staging.parse_page = original


def polars_parse(raw: bytes, page_offset: int) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Polars' reader with the documented types, to Arrow. It has no type for merge_fields (an
    open object, ADDRESS "" or an object), so merge_fields_json and address_country stay null
    and a wrong type anywhere fails the page: an upper bound of its speed, not a parser."""
    import polars as pl
    import pyarrow.compute as pc

    column = pl.read_json(io.BytesIO(raw), schema=_POLARS_SCHEMA).get_column("members").explode()
    members = column.to_arrow().cast(MEMBER_JSON)
    f = dict(zip(MEMBER_JSON.names, members.flatten(), strict=True))
    merge = dict(zip(["FNAME", "LNAME", "PHONE", "BIRTHDAY"], f["merge_fields"].flatten(), strict=True))
    n = len(members)

    def ts(a: pa.Array) -> pa.Array:
        a = pc.replace_substring_regex(a, r"Z$", "+00:00")
        return pc.strptime(a, format="%Y-%m-%dT%H:%M:%S%z", unit="ms", error_is_null=True).cast(staging.UTC_TS)

    columns = {
        **{k: f[k] for k in ("email_address", "unique_email_id", "contact_id", "full_name", "status")},
        "member_id": f["id"],
        **{k.lower(): v for k, v in merge.items()},
        "address_country": pa.nulls(n, pa.string()),
        "merge_fields_json": pa.nulls(n, pa.string()),
        **{k: ts(f[k]) for k in ("timestamp_signup", "timestamp_opt", "last_changed")},
        **{k: f[k] for k in ("language", "vip", "source")},
        "member_rating": f["member_rating"].cast(pa.int16()),
        "country_code": pc.struct_field(f["location"], "country_code"),
        "tags": _tag_list(f["tags"]),
        "page_offset": pa.array([page_offset] * n, pa.int32()),
    }
    return pa.Table.from_pydict(
        {k: columns[k] for k in staging.STAGING_SCHEMA.names}, schema=staging.STAGING_SCHEMA
    ), []


def _tag_list(tags: pa.ListArray) -> pa.Array:
    import pyarrow.compute as pc

    names = pc.struct_field(tags.values, "name")
    return pa.ListArray.from_arrays(tags.offsets, names)


_POLARS_SCHEMA: Any = None


def duckdb_chain(pages: list[tuple[int, bytes]], tmp: Path) -> dict[str, Any]:
    """DuckDB reads the gzipped pages straight to Parquet in one query (one thread), merge_fields
    as JSON text; then the same to_contacts. No de-duplication: a lower bound of its cost."""
    import duckdb

    src = tmp / "pages"
    src.mkdir()
    for offset, raw in pages:
        (src / f"page-{offset:08d}.json.gz").write_bytes(gzip.compress(raw, 1))
    typed = {f.name: f.type for f in MEMBER_JSON}
    text = ", ".join(f"{k} VARCHAR" for k, t in typed.items() if t == pa.string())
    member = (
        f"STRUCT({text}, merge_fields JSON, vip BOOLEAN, member_rating BIGINT, "
        "location STRUCT(country_code VARCHAR), tags STRUCT(name VARCHAR)[])[]"
    )
    ts = "strptime(nullif(m.{0}, ''), '%Y-%m-%dT%H:%M:%S%z')::TIMESTAMPTZ AS {0}"
    query = f"""
        COPY (SELECT m.id AS member_id, m.email_address, m.unique_email_id, m.contact_id, m.full_name, m.status,
                m.merge_fields->>'FNAME' AS fname, m.merge_fields->>'LNAME' AS lname,
                m.merge_fields->>'PHONE' AS phone, m.merge_fields->>'BIRTHDAY' AS birthday,
                m.merge_fields->'ADDRESS'->>'country' AS address_country, m.merge_fields::VARCHAR AS merge_fields_json,
                {ts.format("timestamp_signup")}, {ts.format("timestamp_opt")}, {ts.format("last_changed")},
                m.language, m.vip, m.member_rating::SMALLINT AS member_rating, m.location.country_code AS country_code,
                m.source, list_transform(m.tags, lambda t: t.name) AS tags, 0 AS page_offset
              FROM (SELECT unnest(members) AS m FROM read_json('{src}/*.json.gz', columns={{members: '{member}'}})))
        TO '{tmp / "members.parquet"}' (FORMAT parquet, COMPRESSION zstd)
    """
    con = duckdb.connect(config={"threads": 1})
    c0 = time.process_time()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(query)
    c1 = time.process_time()
    con.close()
    source = pq.ParquetFile(tmp / "members.parquet")
    records = sum(
        transform.to_contacts(source.read_row_group(i), COLLECTION)[0].num_rows for i in range(source.num_row_groups)
    )
    c2 = time.process_time()
    staged = source.metadata.num_rows
    return {"staged": staged, "records": records, "staging_cpu_s": c1 - c0, "transform_cpu_s": c2 - c1}


def floors(pages: list[tuple[int, bytes]]) -> dict[str, float]:
    """CPU per member of reading the pages alone (best of 3): Arrow's reader, orjson with and
    without the cyclic collector running."""
    members = sum(len(orjson.loads(raw)["members"]) for _, raw in pages)

    def best(read: Callable[[bytes], Any], paused: bool = False) -> float:
        times = []
        for _ in range(3):
            if paused:
                gc.disable()
            c0 = time.process_time()
            for _, raw in pages:
                read(raw)
            times.append(time.process_time() - c0)
            gc.enable()
        return min(times) / members * 1e6

    return {
        "Arrow's JSON reader": best(read_page_json),
        "orjson.loads, collector running": best(orjson.loads),
        "orjson.loads, collector paused": best(orjson.loads, paused=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    pages = make_pages(args.pages)
    alternatives: dict[str, Callable[[Path], dict[str, Any]]] = {
        "orjson + Arrow builders, collector paused (kept: staging.parse_page)": lambda d: chain(
            staging.parse_page, pages, d
        )
    }
    parsed = {offset: staging.parse_page(raw, offset) for offset, raw in pages}
    alternatives["no parser (tables parsed beforehand): the ceiling the rest of the chain allows"] = lambda d: chain(
        lambda raw, offset: parsed[offset], pages, d
    )
    old = two_parsers()
    if old is not None:
        alternatives[f"two parsers ({TWO_PARSERS_REV}: Arrow reader + regexes, per-member fallback)"] = lambda d: chain(
            old.parse_page, pages, d
        )
        alternatives["its per-member parser alone (orjson + Arrow builders, collector running)"] = lambda d: chain(
            old._parse_page_python, pages, d
        )
    try:
        import polars as pl

        global _POLARS_SCHEMA
        _POLARS_SCHEMA = pl.Schema(pa.schema([pa.field("members", pa.list_(MEMBER_JSON))]))
        alternatives["Polars reader, typed fields only (no merge_fields: not a parser)"] = lambda d: chain(
            polars_parse, pages, d
        )
    except ImportError:
        print("polars not installed: skipped")
    try:
        import duckdb  # noqa: F401

        alternatives["DuckDB: gzipped pages -> Parquet in one query (no de-duplication)"] = lambda d: duckdb_chain(
            pages, d
        )
    except ImportError:
        print("duckdb not installed: skipped")

    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-parsers-") as tmp:
        for i in range(args.rounds):
            for j, (name, run) in enumerate(alternatives.items()):
                folder = Path(tmp, f"r{i}-{j}")
                folder.mkdir()
                out = run(folder)
                out["cpu_s"] = out["staging_cpu_s"] + out["transform_cpu_s"]
                if name not in best or out["cpu_s"] < best[name]["cpu_s"]:
                    best[name] = out
    print(
        f"{args.pages} pages, {sum(len(orjson.loads(r)['members']) for _, r in pages):,} members; best of {args.rounds}"
    )
    print(
        f"{'members/s per core':>19} {'staging us':>10} {'transform us':>12} {'staged':>7} {'records':>7}  alternative"
    )
    for name, out in best.items():
        n = out["staged"]
        staging_us, transform_us = out["staging_cpu_s"] / n * 1e6, out["transform_cpu_s"] / n * 1e6
        print(
            f"{n / out['cpu_s']:>19,.0f} {staging_us:>10.2f} {transform_us:>12.2f} {n:>7} {out['records']:>7}  {name}"
        )
    print("reading the pages alone, us per member (best of 3):")
    for name, us in floors(pages).items():
        print(f"{1e6 / us:>19,.0f} {us:>10.2f}  {name}")


if __name__ == "__main__":
    main()
