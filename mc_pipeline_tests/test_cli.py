"""`mc-pipeline partitions`, `init` and `sandbox` as a new user meets them (DAGSTER_HOME, the registry, the port)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from dagster import DagsterInstance
from dagster._core.run_coordinator import QueuedRunCoordinator

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


ROOT = Path(__file__).resolve().parents[1]


def _limits(instance: DagsterInstance) -> list[dict]:
    coordinator = instance.run_coordinator
    assert isinstance(coordinator, QueuedRunCoordinator)
    return list(coordinator.get_run_queue_config().tag_concurrency_limits)


def test_init_writes_an_instance_with_productions_run_queue_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Issue 12 item 1: the README's `.dagster_home` had no dagster.yaml, so no run queue and no
    account limits (5 runs at once, two per account). `init` writes the limits of production's file."""
    home = tmp_path / ".dagster_home"
    assert main(["init", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "written" in out and f"export DAGSTER_HOME={home}" in out
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    production = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    with DagsterInstance.get() as instance:
        assert _limits(instance) == production["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert main(["init", "--home", str(home)]) == 0
    assert "up to date" in capsys.readouterr().out
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert main(["init", "--home", str(home)]) == 0
    assert "kept as it is" in capsys.readouterr().out  # a file of the user's is never overwritten
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"


def test_partitions_on_first_use_give_the_home_the_same_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert main(["partitions", "list"]) == 0
    assert "written" in capsys.readouterr().err
    with DagsterInstance.get() as instance:
        assert {lim["key"] for lim in _limits(instance)} >= {"mc_pipeline/mailchimp_account", "dagster/partition"}


def test_partitions_need_an_instance_and_say_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    with pytest.raises(SystemExit, match="mc-pipeline init"):
        main(["partitions", "add", "client-1:ac8136eaff"])


def test_partitions_list_registry_prints_the_real_keys(
    small_env: LocalEnvironment, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Issue 12 item 3: how to form a real key. No DAGSTER_HOME needed: it reads only the registry."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert main(["partitions", "list", "--registry"]) == 0
    assert capsys.readouterr().out.split() == small_env.partition_keys()
    data = yaml.safe_load(small_env.registry.read_text())
    data["clients"][0]["lists"] = "all"  # resolved as the sensor does: Mailchimp is asked
    small_env.registry.write_text(yaml.safe_dump(data))
    assert main(["partitions", "list", "--registry"]) == 0
    assert sorted(capsys.readouterr().out.split()) == sorted(small_env.partition_keys())
    monkeypatch.delenv("MC_PIPELINE_CLIENTS")
    assert main(["partitions", "list", "--registry"]) == 2
    assert "MC_PIPELINE_CLIENTS is not set" in capsys.readouterr().err


def test_sandbox_says_sandbox_on_only_once_it_accepts_connections(tmp_path: Path) -> None:
    """Issue 12 item 2: "sandbox on ..." came before the members were generated (11 s for the
    README's sizes), so the README's next command was refused. Now the first connection attempt
    right after the line succeeds; the keys it prints are those the sandbox serves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "mc_pipeline.cli", "sandbox", "--port", str(port), "--members", "20000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:  # ends if the process dies
            lines.append(line)
            if line.startswith("sandbox on"):
                break
        assert lines and lines[-1].startswith(f"sandbox on http://127.0.0.1:{port}"), lines
        served = requests.get(f"http://127.0.0.1:{port}/_sandbox/config", timeout=10).json()  # one attempt
        keys = [f"{c['client_id']}:{x['id']}" for c in served["clients"] for x in c["lists"]]
        assert any(line.startswith("partition keys") and keys[0] in line for line in lines)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_generated_files_are_ignored_by_git() -> None:
    """Issue 12 item 5: the demo's folder, the sandbox's registry and its keys file were not ignored."""
    generated = [".mc_pipeline_demo/sandbox.env", "clients.yaml", "sandbox.env", ".dagster_home/dagster.yaml"]
    tracked = ["deploy/sandbox.env", "deploy/clients.sandbox.yaml", "deploy/clients.yaml", "deploy/dagster.yaml"]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *generated, *tracked],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode == 128:
        pytest.skip(f"not a git checkout: {done.stderr.strip()}")
    ignored = {line.split("\t")[-1] for line in done.stdout.splitlines() if not line.startswith("::")}
    assert ignored == set(generated), done.stdout
