"""Page parsing and the staging writer: wrong types never fail a page; duplicates resolve to the latest."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from mc_pipeline.staging import STAGING_SCHEMA, StagingWriter, id_keys, parse_page


def page(*members: object, total: int | None = None) -> bytes:
    return orjson.dumps({"members": list(members), "total_items": total if total is not None else len(members)})


def test_wrong_types_become_nulls_not_failures() -> None:
    weird = {
        "id": "a" * 32,
        "email_address": 12345,
        "status": ["subscribed"],
        "merge_fields": "not an object",
        "location": None,
        "vip": "yes",
        "member_rating": 10**9,
        "timestamp_opt": "yesterday",
        "last_changed": "2024-01-01T00:00:00Z",
        "tags": [{"id": 1}, "x", {"name": "ok"}],
    }
    table, dead = parse_page(page(weird))
    assert not dead
    row = table.to_pylist()[0]
    assert row["email_address"] == "12345"
    assert row["status"] is None
    assert row["fname"] is None and row["merge_fields_json"] == "{}"
    assert row["vip"] is None and row["member_rating"] is None
    assert row["timestamp_opt"] is None
    assert row["last_changed"] == datetime(2024, 1, 1, tzinfo=UTC)
    assert row["tags"] == ["ok"]


def test_a_fraction_is_not_a_rating_and_a_tag_without_a_name_is_no_tag() -> None:
    """Arrow's builders take 1.5 for an int16 (as 1) and a null in a list of strings: neither may pass."""
    table, _ = parse_page(
        page(
            {"id": "a" * 32, "member_rating": 1.5, "tags": [{"name": None}, {"name": "vip"}]},
            {"id": "b" * 32, "member_rating": 4, "tags": []},
        )
    )
    assert table.column("member_rating").to_pylist() == [None, 4]
    assert table.column("tags").to_pylist() == [["vip"], []]


def test_members_without_id_are_dead_letters() -> None:
    table, dead = parse_page(page({"id": "b" * 32}, {"email_address": "x@y.z"}, "junk", {"id": ""}))
    assert table.num_rows == 1
    assert [d["reason"] for d in dead] == ["member without an id"] * 3
    assert '"email_address":"x@y.z"' in dead[0]["payload"]


def test_a_page_without_members_is_an_error() -> None:
    with pytest.raises(ValueError, match="no 'members' list"):
        parse_page(orjson.dumps({"total_items": 3}), 2000)


def test_parsing_gives_the_collector_back_as_it_found_it() -> None:
    """parse_page pauses the cyclic collector: on, it is on again after a page, even a bad one."""
    import gc

    assert gc.isenabled()
    parse_page(page({"id": "a" * 32}))
    with pytest.raises(ValueError):
        parse_page(orjson.dumps({"total_items": 0}))
    assert gc.isenabled()
    gc.disable()
    try:
        parse_page(page({"id": "a" * 32}))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_id_keys_are_stable_and_distinct() -> None:
    import pyarrow as pa

    hex_ids = pa.array([f"{i:032x}" for i in range(1000)])
    keys = id_keys(hex_ids)
    assert len(set(keys.tolist())) == 1000
    odd = pa.array(["not-hex-" + str(i) for i in range(10)])
    assert len(set(id_keys(odd).tolist())) == 10


def test_writer_keeps_the_latest_version_of_a_duplicate(tmp_path: Path) -> None:
    def m(i: int, changed: str, name: str) -> dict:
        return {
            "id": f"{i:032x}",
            "email_address": f"m{i}@x.org",
            "last_changed": changed,
            "merge_fields": {"FNAME": name},
        }

    writer = StagingWriter(tmp_path / "members.parquet")
    writer.write_page(page(m(1, "2024-01-01T00:00:00+00:00", "old"), m(2, "2024-01-01T00:00:00+00:00", "two")), 0)
    writer.write_page(page(m(1, "2024-03-01T00:00:00+00:00", "new"), m(3, "2024-01-01T00:00:00+00:00", "three")), 2)
    writer.write_page(page(m(2, "2024-01-01T00:00:00+00:00", "two-later-page")), 4)
    summary = writer.close()
    table = pq.read_table(tmp_path / "members.parquet")
    assert table.schema.equals(STAGING_SCHEMA, check_metadata=False)
    names = dict(zip(table.column("member_id").to_pylist(), table.column("fname").to_pylist(), strict=True))
    assert names == {f"{1:032x}": "new", f"{2:032x}": "two-later-page", f"{3:032x}": "three"}
    assert summary.rows == 3 and summary.duplicates == 2


def test_writer_without_duplicates_streams_row_groups(tmp_path: Path) -> None:
    writer = StagingWriter(tmp_path / "m.parquet")
    for p in range(60):
        writer.write_page(page(*[{"id": f"{p * 1000 + i:032x}"} for i in range(1000)]), p * 1000)
    summary = writer.close()
    meta = pq.ParquetFile(tmp_path / "m.parquet").metadata
    assert summary.rows == 60_000 and summary.duplicates == 0
    assert meta.num_rows == 60_000 and meta.num_row_groups >= 2
    assert not (tmp_path / "m.parquet.partial").exists()


def test_id_keys_do_not_collapse_ids_with_equal_halves() -> None:
    import pyarrow as pa

    ids = pa.array([c * 32 for c in "0123456789abcdef"])  # each id's two halves are equal
    assert len(set(id_keys(ids).tolist())) == 16


def test_known_contacts_fold_newest_first_and_return_the_gone(tmp_path: Path) -> None:
    import time

    import pyarrow as pa

    from mc_pipeline.storage import KnownContacts

    known = KnownContacts(tmp_path / "known")
    known.add("run1", pa.table({"id": ["a" * 32, "b" * 32], "email": ["a@x.org", "b@x.org"]}))
    time.sleep(0.01)
    known.add("run2", pa.table({"id": ["b" * 32, "c" * 32], "email": ["b2@x.org", "c@x.org"]}))
    gone = known.reconcile(id_keys(pa.array(["a" * 32, "c" * 32])), id_keys)
    assert gone.select(["id", "email"]).to_pylist() == [{"id": "b" * 32, "email": "b2@x.org"}]  # the newest email
    assert sorted(r["id"] for r in known.read().to_pylist()) == ["a" * 32, "c" * 32]
    assert [f.name for f in known.files()] == ["base.parquet"]


def _member(i: int, changed: str) -> dict:
    return {"id": f"{i:032x}", "email_address": f"m{i}@x.org", "last_changed": changed}


def test_overlap_duplicates_are_told_from_members_that_changed_during_the_sync(tmp_path: Path) -> None:
    """The same member with the same last_changed on two adjacent pages is the pages' overlap, not a change."""
    old, new = "2024-01-01T00:00:00+00:00", "2024-03-01T00:00:00+00:00"
    writer = StagingWriter(tmp_path / "members.parquet")
    writer.write_page(page(*[_member(i, old) for i in range(5)]), 0)
    writer.write_page(page(*[_member(i, old) for i in range(3, 8)]), 3)  # overlaps members 3 and 4
    writer.write_page(page(_member(1, new)), 8)  # member 1 changed while the list was paged
    writer.write_page(page(_member(4, old), _member(4, new)), 9)  # member 4: its old version once more, and a new one
    summary = writer.close()
    assert summary.rows == 8 and summary.rows_read == 13
    assert summary.overlap_duplicates == 3 and summary.changed_duplicates == 2 and summary.duplicates == 5


def test_duplicates_across_written_row_groups_are_told_apart_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond a row group (a second pass of a big window) the rewrite at close counts the same way."""
    from mc_pipeline import staging

    monkeypatch.setattr(staging, "_ROW_GROUP_ROWS", 100)
    old, new = "2024-01-01T00:00:00+00:00", "2024-03-01T00:00:00+00:00"
    writer = StagingWriter(tmp_path / "m.parquet")
    for p in range(6):
        writer.write_page(page(*[_member(p * 100 + i, old) for i in range(100)]), p * 100)
    writer.write_page(page(*[_member(i, old) for i in range(10)], *[_member(10 + i, new) for i in range(4)]), 0)
    summary = writer.close()
    assert pq.ParquetFile(tmp_path / "m.parquet").metadata.num_row_groups >= 2
    assert summary.rows == 600 == pq.ParquetFile(tmp_path / "m.parquet").metadata.num_rows
    assert summary.overlap_duplicates == 10 and summary.changed_duplicates == 4


def test_known_hashes_are_the_newest_per_contact_and_survive_the_fold(tmp_path: Path) -> None:
    """Item 4 of issue 11: the hash of the record Ometria last accepted, by 64-bit key, vectorised."""
    import time

    import numpy as np
    import pyarrow as pa

    from mc_pipeline.storage import KnownContacts

    a, b, c, d = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)
    known = KnownContacts(tmp_path / "known")
    assert not known.hashes(id_keys).unchanged(id_keys(pa.array([a])), np.array([7], np.uint64)).any()  # empty store
    known.add("run0", pa.table({"id": [d], "email": ["d@x.org"]}))  # written before hashes existed: none known
    time.sleep(0.01)
    rows = {"id": [a, b], "email": ["a@x.org", "b@x.org"], "hash": pa.array([11, 12], pa.uint64())}
    known.add("run1", pa.table(rows))
    time.sleep(0.01)
    known.add("run2", pa.table({"id": [b, c], "email": ["b@x.org", None], "hash": pa.array([22, 23], pa.uint64())}))
    held = known.hashes(id_keys)
    assert held.keys.dtype == held.hashes.dtype == np.uint64 and len(held.keys) == 4  # 16 bytes a contact
    probe = id_keys(pa.array([a, b, b, c, d, "e" * 32]))
    assert held.unchanged(probe, np.array([11, 12, 22, 23, 0, 5], np.uint64)).tolist() == [
        True,  # a: as recorded
        False,  # b: 12 is its older record; Ometria last accepted 22
        True,
        True,
        False,  # d: no hash known, never taken as unchanged
        False,  # e: never pushed
    ]
    known.reconcile(id_keys(pa.array([a, b, c])), id_keys)  # d is gone; the hashes survive the fold
    after = known.hashes(id_keys)
    assert after.unchanged(id_keys(pa.array([a, b, c])), np.array([11, 22, 23], np.uint64)).all()
    assert len(after.keys) == 3 and known.read().column("hash").to_pylist().count(None) == 0


def test_hashes_of_another_version_read_as_unknown_never_as_a_match(tmp_path: Path) -> None:
    """A change of the hash (transform.RECORD_HASH_VERSION) leaves the stored hashes meaningless: they
    read as unknown, so each such record is pushed once, never skipped on a stale comparison."""
    import time

    import numpy as np
    import pyarrow as pa

    from mc_pipeline.storage import KNOWN_SCHEMA, KnownContacts
    from mc_pipeline.transform import RECORD_HASH_VERSION

    a, b, c = ("a" * 32, "b" * 32, "c" * 32)
    folder = tmp_path / "known"
    folder.mkdir()
    seen = pa.array([datetime(2026, 1, 1, tzinfo=UTC)], KNOWN_SCHEMA.field("seen").type)
    # Written before `hash_version` existed (version 1: a hash of the record's bytes), and by a later version.
    pq.write_table(
        pa.table({"id": [a], "email": ["a@x.org"], "seen": seen, "hash": pa.array([11], pa.uint64())}),
        folder / "delta-v1.parquet",
    )
    later = pa.array([RECORD_HASH_VERSION + 1], pa.uint8())
    pq.write_table(
        pa.table(
            {"id": [b], "email": ["b@x.org"], "seen": seen, "hash": pa.array([12], pa.uint64()), "hash_version": later}
        ),
        folder / "delta-later.parquet",
    )
    time.sleep(0.01)
    known = KnownContacts(folder)
    known.add("run1", pa.table({"id": [c], "email": ["c@x.org"], "hash": pa.array([13], pa.uint64())}))
    probe = (id_keys(pa.array([a, b, c])), np.array([11, 12, 13], np.uint64))
    assert known.hashes(id_keys).unchanged(*probe).tolist() == [False, False, True]
    versions = {r["id"]: r["hash_version"] for r in known.read().to_pylist()}
    assert versions == {a: None, b: RECORD_HASH_VERSION + 1, c: RECORD_HASH_VERSION}
    known.reconcile(id_keys(pa.array([a, b, c])), id_keys)  # the fold keeps each row's version
    assert known.hashes(id_keys).unchanged(*probe).tolist() == [False, False, True]
