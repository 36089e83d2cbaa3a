"""The README's "Running it" and "The sandbox" shell blocks, run as written in a fresh folder.

Each block is read from README.md, so the test and the README cannot drift apart. The sandbox
block runs in the background (as in the README's first terminal); the next block runs in
`bash -e` (the second terminal) with only the environment a new shell has: no DAGSTER_HOME,
no MC_PIPELINE_*. Only the port is changed (8080 may be taken), and the sandbox section's sizes
(360,000 members would only make the test slow). `dagster dev` serves until Ctrl-C: it is not run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def shell_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start:end], re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_shell_env() -> dict[str, str]:
    """A new user's shell: the venv on PATH, this checkout importable, nothing of ours set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "MC_PIPELINE_", "MC_SANDBOX_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return env


@contextmanager
def first_terminal(block: str, cwd: Path, env: dict[str, str]) -> Iterator[tuple[list[str], float]]:
    """The sandbox block in the background until "sandbox on"; yields its lines and the seconds it took."""
    assert block.lstrip().startswith("mc-pipeline sandbox "), block
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + block.strip()],
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:  # ends if the process dies
            lines.append(line.rstrip("\n"))
            if line.startswith("sandbox on"):
                break
        assert lines and lines[-1].startswith("sandbox on"), "\n".join(lines)
        yield lines, time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(10)


def second_terminal(block: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def test_running_it_as_written(tmp_path: Path) -> None:
    """Issue 12 items 1-3: the README's local flow, from `mc-pipeline init` to a replay, in a new shell."""
    sandbox, commands, ui = shell_blocks("Running it")
    assert ui.strip().startswith("dagster dev -m mc_pipeline.definitions")  # serves until Ctrl-C: not run here
    port = str(free_port())
    env = new_shell_env()
    with first_terminal(sandbox.replace("8080", port), tmp_path, env) as (lines, startup):
        assert startup < 30
        # "sandbox on" means listening: one attempt, no retry.
        assert requests.get(f"http://127.0.0.1:{port}/_sandbox/health", timeout=5).json() == {"status": "ok"}
        keys = next(line for line in lines if line.startswith("partition keys")).split(": ", 1)[1].split(", ")
        started = time.monotonic()
        out = second_terminal(commands.replace("8080", port), tmp_path, env)
        took = time.monotonic() - started
        om = requests.get(f"http://127.0.0.1:{port}/_sandbox/ometria/accounts/client-1/contacts", timeout=10).json()
        config = requests.get(f"http://127.0.0.1:{port}/_sandbox/config", timeout=10).json()
    # The instance has production's queue limits (item 1), in the folder the README exports.
    instance_file = yaml.safe_load((tmp_path / ".dagster_home" / "dagster.yaml").read_text())
    limited = {lim["key"] for lim in instance_file["run_coordinator"]["config"]["tag_concurrency_limits"]}
    production = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    assert limited == {lim["key"] for lim in production["run_coordinator"]["config"]["tag_concurrency_limits"]}
    # The key the README forms is a real one (item 3): added, synced twice, its contacts in Ometria.
    client_id, list_id = keys[0].split(":")
    served = {x["id"]: x["members"] for c in config["clients"] if c["client_id"] == client_id for x in c["lists"]}
    assert keys == [f"{client_id}:{x}" for x in served]
    assert "\n".join(keys) in out  # `partitions list --registry`, as the sandbox printed them
    assert f"KEY={keys[0]}" in commands.split()  # the README's key is the registry's first
    assert "added 1 partitions" in out
    assert out.split("added 1 partitions", 1)[1].split()[0] == keys[0]  # `partitions list` after the add
    assert "no dead letters" in out and "0 dead letters: would push 0" in out
    held = om["contacts"][f"mailchimp-{list_id}"]
    # One write a member: the sync; the full refresh found every record unchanged and pushed none.
    assert len(held) == served[list_id] and om["writes"] == served[list_id]
    # Not asserted: a timed test fails on a loaded machine (142 s seen beside two benchmarks). The
    # newcomer's times are measured in the issue notes; the test prints them.
    print(f"the README's commands took {took:.0f}s")


def test_the_sandbox_section_as_written(tmp_path: Path) -> None:
    """Issue 12 item 2: the sandbox block blocks its terminal; the curl in the next one is answered at once."""
    sandbox, client = shell_blocks("The sandbox")[:2]
    assert "--members 20000,100000" in sandbox
    port = str(free_port())
    env = new_shell_env()
    small = sandbox.replace("8080", port).replace("--members 20000,100000", "--members 50,80")
    with first_terminal(small, tmp_path, env) as (lines, _):
        out = second_terminal(client.replace("8080", port), tmp_path, env)
    served = yaml.safe_load(out)  # the JSON of GET /3.0/lists?fields=lists.id,total_items
    keys = next(line for line in lines if line.startswith("partition keys")).split(": ", 1)[1].split(", ")
    assert served["total_items"] == 2 and [f"client-1:{x['id']}" for x in served["lists"]] == keys[:2]


def test_a_dagster_command_in_the_repository_root_works_without_dagster_home() -> None:
    """Issue 12 item 1: the root dagster.yaml was production's, so `dagster definitions validate`
    there without DAGSTER_HOME printed a traceback about DAGSTER_PG_PORT. No instance file is left
    in the root now (it is deploy/dagster.yaml), so Dagster's temporary instance works."""
    assert not (ROOT / "dagster.yaml").exists() and not (ROOT / "dagster.yml").exists()
    done = subprocess.run(
        ["dagster", "definitions", "validate", "-m", "mc_pipeline.definitions"],
        cwd=ROOT,
        env=new_shell_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DAGSTER_PG" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("section", ["Running it", "The sandbox"])
def test_no_block_needs_a_backgrounded_server(section: str) -> None:
    """Each server command stands alone in its block (it blocks its terminal); none is put behind `&`."""
    for block in shell_blocks(section):
        if re.search(r"^(mc-pipeline sandbox|dagster dev)\b", block, re.M):
            commands = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith((" ", "#"))]
            assert len(commands) == 1, block
        assert not re.search(r"&\s*(#.*)?$", block, re.M), block
