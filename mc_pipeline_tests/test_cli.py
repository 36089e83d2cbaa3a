"""The `mc-pipeline partitions` command against a Dagster instance (DAGSTER_HOME)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance

from mc_pipeline.cli import main
from mc_pipeline.local import LocalEnvironment
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


def test_a_key_with_a_trailing_newline_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Issue 9 item 11: `$` matched before the final newline, so this key was added."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.delenv("MC_PIPELINE_CLIENTS", raising=False)
    assert main(["partitions", "add", "acme:1a2d7ebf82\n"]) == 2
    assert "is not '<client_id>:<list_id>'" in capsys.readouterr().err
    with DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions(MAILCHIMP_LISTS) == []


def test_partitions_add_refuses_keys_the_registry_does_not_know(
    small_env: LocalEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Issue 12 item 3: a key the registry does not list would be deleted by the sensor later; with
    MC_PIPELINE_CLIENTS set it is refused, with the registry's real keys. `lists: all` asks Mailchimp."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    real = small_env.partition_keys()
    for lists, before in ((None, []), ("all", real)):
        if lists:
            data = yaml.safe_load(small_env.registry.read_text())
            data["clients"][0]["lists"] = lists
            small_env.registry.write_text(yaml.safe_dump(data))
        assert main(["partitions", "add", "acme:1a2d7ebf82", real[0]]) == 2
        err = capsys.readouterr().err
        assert "partition acme:1a2d7ebf82: client 'acme' is not in the registry (its clients: client-1)" in err
        assert "'<client id>:<list id>'" in err and str(small_env.registry) in err
        assert main(["partitions", "add", "client-1:00000000aa"]) == 2
        err = capsys.readouterr().err
        assert "list 00000000aa is not a list of client 'client-1' in the registry" in err and real[0] in err
        with DagsterInstance.get() as instance:
            assert sorted(instance.get_dynamic_partitions(MAILCHIMP_LISTS)) == sorted(before)  # nothing added
        assert main(["partitions", "add", *real]) == 0
        assert f"added {2 if lists is None else 0} partitions" in capsys.readouterr().out
    assert main(["partitions", "remove", real[0]]) == 0
    assert "the registry still lists" in capsys.readouterr().out
