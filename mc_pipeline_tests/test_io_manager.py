"""StateIOManager for op outputs (the transform op inside `ometria/contacts`): stored per run and step."""

from datetime import UTC, datetime
from pathlib import Path

import pytest
from dagster import build_input_context, build_output_context

from mc_pipeline.assets.models import ContactsFile, RunFiles, Window
from mc_pipeline.io_manager import StateIOManager


def _contacts() -> ContactsFile:
    window = Window(since=None, before=datetime(2026, 1, 1, tzinfo=UTC), full_refresh=True)
    run = RunFiles(
        partition="acme:0123456789", client_id="acme", list_id="0123456789", run_id="r1", folder="/x", window=window
    )
    return ContactsFile(
        run=run, total_items=3, staged_rows=3, path="/x/contacts.parquet", collection="c", records=3, dead_letters=0
    )


def test_an_op_output_is_read_back_by_the_input_it_feeds(tmp_path: Path) -> None:
    io = StateIOManager(base_dir=str(tmp_path))
    out = build_output_context(run_id="run-1", step_key="contacts.transform", name="result")
    io.handle_output(out, _contacts())
    assert (tmp_path / "ops" / "run-1" / "contacts_transform.result.json").is_file()
    assert io.load_input(build_input_context(upstream_output=out)) == _contacts()


def test_an_input_without_upstream_output_says_so(tmp_path: Path) -> None:
    """Issue 10 item 8 (mypy): upstream_output is Optional; it was read three times unguarded, an
    AttributeError on None. Now one narrowing, and an error that says what is missing."""
    with pytest.raises(ValueError, match="no upstream output"):
        StateIOManager(base_dir=str(tmp_path)).load_input(build_input_context())
