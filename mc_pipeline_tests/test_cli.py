"""The `mc-pipeline partitions` command against a Dagster instance (DAGSTER_HOME)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance

from mc_pipeline.cli import main
from mc_pipeline.partitions import MAILCHIMP_LISTS


def test_partitions_add_list_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert main(["partitions", "add", "acme:1a2d7ebf82", "acme:0123456789"]) == 0
    assert main(["partitions", "add", "acme:1a2d7ebf82"]) == 0
    assert "added 0 partitions (1 existed)" in capsys.readouterr().out
    assert main(["partitions", "list"]) == 0
    assert capsys.readouterr().out.split() == ["acme:1a2d7ebf82", "acme:0123456789"]
    assert main(["partitions", "remove", "acme:0123456789"]) == 0
    with DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions(MAILCHIMP_LISTS) == ["acme:1a2d7ebf82"]


def test_hostile_partition_keys_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert main(["partitions", "add", "../etc:passwd"]) == 2
    assert "is not '<client_id>:<list_id>'" in capsys.readouterr().err


def test_partitions_need_an_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    with pytest.raises(SystemExit, match="DAGSTER_HOME is not set"):
        main(["partitions", "list"])
