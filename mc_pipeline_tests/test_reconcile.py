"""The pure reconciliation (mc_pipeline/reconcile.py) and the listed members the transform hands the import."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

import mc_pipeline.reconcile as reconcile
from mc_pipeline.reconcile import NEVER, Backlog, KnownHashes, judge, listed_keys
from mc_pipeline.staging import StagingWriter, id_keys

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_module_imports_nothing_of_the_package() -> None:
    """Like staging.py and transform.py: no files, no resources, so it is tested without any."""
    tree = ast.parse(Path(reconcile.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("mc_pipeline")]


def test_judge_keeps_the_listed_and_those_seen_after_the_bound() -> None:
    keys = np.array([3, 1, 2, 3, 4], np.uint64)  # rows newest first: key 3 twice
    seen = np.array([100, 50, 50, 10, NEVER], np.int64)
    bound = datetime.fromtimestamp(60, UTC)
    judged = judge(keys, seen, listed=np.array([1], np.uint64), judged_until=bound)
    assert judged.newest.tolist() == [True, True, True, False, True]
    assert judged.last_seen.tolist() == [100, 50, 50, 100, NEVER]  # each row: its key's latest
    assert judged.kept.tolist() == [True, True, False, True, False]  # 3: seen after the bound; 2, 4: gone
    assert judge(keys, seen, np.array([1], np.uint64), None).kept.tolist() == [False, True, False, False, False]


def test_known_hashes_take_each_keys_newest_row() -> None:
    held = KnownHashes.newest(np.array([5, 7, 5], np.uint64), np.array([50, 70, 51], np.uint64))
    assert held.keys.tolist() == [5, 7] and held.hashes.tolist() == [50, 70]
    probe = held.unchanged(np.array([5, 5, 7, 8], np.uint64), np.array([50, 51, 70, 1], np.uint64))
    assert probe.tolist() == [True, False, True, False]
    assert not KnownHashes.none().unchanged(np.array([5], np.uint64), np.array([50], np.uint64)).any()


def _add(backlog: Backlog, ids: list[int], hashes: list[int], built: list[int] | None = None) -> None:
    """`built`, when given, collects the ids whose record the backlog asked for."""
    names = [f"{i:032x}" for i in ids]
    id_array = pa.array(names)

    def records_of(changed: np.ndarray) -> list[dict]:
        chosen = [i for i, c in zip(ids, changed, strict=True) if c]
        if built is not None:
            built.extend(chosen)
        return [{"id": f"{i:032x}"} for i in chosen]

    emails = pa.array([f"{n}@x.org" for n in names])
    backlog.add(id_array, emails, id_keys(id_array), np.array(hashes, np.uint64), records_of)


def test_the_backlog_hands_out_whole_batches_and_what_to_record_once_answered() -> None:
    held = KnownHashes.newest(id_keys(pa.array([f"{i:032x}" for i in range(3)])), np.array([1, 2, 3], np.uint64))
    backlog = Backlog(held)
    _add(backlog, list(range(8)), [1, 2, 9, 4, 5, 6, 7, 8])  # 0 and 1 unchanged; 2 changed; 3..7 new
    assert backlog.skipped == 2 and len(backlog.todo) == 6 and not backlog.due(4)
    batches = backlog.take(4, final=False)
    assert [[r["id"][-1] for r in b] for b in batches] == [["2", "3", "4", "5"]]  # whole batches only
    assert backlog.due(4) and not backlog.due(5)  # 4 handed out since the last checkpoint
    recorded = backlog.checkpoint()
    assert recorded is not None and recorded.column("hash").to_pylist() == [1, 2, 9, 4, 5, 6]  # skipped + pushed
    batches = backlog.take(4, final=True)
    assert [[r["id"][-1] for r in b] for b in batches] == [["6", "7"]]
    recorded = backlog.checkpoint()
    assert recorded is not None and recorded.column("id").to_pylist() == [f"{6:032x}", f"{7:032x}"]
    assert backlog.take(4, final=True) == [] and backlog.checkpoint() is None


def test_the_backlog_builds_records_only_for_the_changed_rows() -> None:
    """An unchanged row costs its hash and a lookup, never a record (issue 11, item 4: a full refresh
    of an unchanged list builds no record at all)."""
    held = KnownHashes.newest(id_keys(pa.array([f"{i:032x}" for i in range(4)])), np.array([1, 2, 3, 4], np.uint64))
    backlog, built = Backlog(held), []
    _add(backlog, [0, 1, 2, 3], [1, 2, 3, 4], built)  # all unchanged
    assert built == [] and backlog.skipped == 4 and not backlog.todo
    _add(backlog, [0, 1, 2, 3, 9], [1, 7, 3, 4, 5], built)  # 1 changed, 9 new
    assert built == [1, 9] and [r["id"] for r in backlog.todo] == [f"{1:032x}", f"{9:032x}"]
    batches, recorded = backlog.take(100, final=True), backlog.checkpoint()
    assert [len(b) for b in batches] == [2]
    assert recorded is not None and recorded.num_rows == 9  # the skipped and the pushed, each with its hash


def test_listed_keys_are_sorted_and_unique() -> None:
    assert listed_keys([]).dtype == np.uint64 and not len(listed_keys([]))
    assert listed_keys([np.array([3, 1], np.uint64), np.array([1, 2], np.uint64)]).tolist() == [1, 2, 3]


def test_the_transform_hands_the_import_every_listed_member_on_a_full_refresh(tmp_path: Path) -> None:
    """Issue 10, item 3: the import judges deletions from its declared input, not by re-reading the
    staging file. A member that cannot become a contact (no email) is still listed: never a tombstone."""
    from mc_pipeline.assets.models import RunFiles, StagedMembers, Window
    from mc_pipeline.assets.ometria import _convert
    from mc_pipeline.storage import RunFolder, load_keys

    members = [
        {"id": f"{i:032x}", "email_address": f"m{i}@x.org" if i else "", "contact_id": f"{i + 100:032x}"}
        for i in range(5)
    ]
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    writer = StagingWriter(folder.members)
    writer.write_page(orjson.dumps({"members": members, "total_items": 5}), 0)
    writer.close()

    def staged(full_refresh: bool) -> StagedMembers:
        window = Window(since=None if full_refresh else T0, before=T0 + timedelta(1), full_refresh=full_refresh)
        run = RunFiles(
            partition="acme:0123456789",
            client_id="acme",
            list_id="0123456789",
            run_id="r",
            folder=str(folder.root),
            window=window,
        )
        return StagedMembers(run=run, total_items=5, path=str(folder.members), rows=5, duplicates=0, dead_letters=0)

    done = _convert(staged(True), folder, "mailchimp-0123456789", False)
    assert done.records == 4 and done.dead_rows == 1
    expected = np.unique(id_keys(pa.array([f"{i + 100:032x}" for i in range(5)])))
    assert load_keys(folder.listed).tolist() == expected.tolist()
    folder.listed.unlink()
    assert _convert(staged(False), folder, "mailchimp-0123456789", False).listed is None
    assert not folder.listed.exists()  # an incremental window lists only the changed: nothing to judge by
