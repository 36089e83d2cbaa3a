"""No key in any log line, event, tag, run config, metadata, partition key, file or error page.

A full sync (and a failing one) runs with recognisable keys through the `dagster` CLI; then
everything written is searched for them: the process output, every file under DAGSTER_HOME
(the SQLite event log and compute logs included) and the data dir (gzipped pages decompressed).
"""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import requests
from dagster import DagsterInstance

from mc_pipeline.local import patched_environ, sandbox_environment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.sandbox import AccountSpec, ListSpec, SandboxConfig
from mc_pipeline_tests.helpers import dagster_materialize_command

MAILCHIMP_KEY = "5ec7e75ec7e75ec7e75ec7e75ec7e75e-us6"  # "secret" in hex-ish, easy to find
OMETRIA_KEY = "om-SECRET-MARKER-7f3a9c"
MARKERS = (MAILCHIMP_KEY, MAILCHIMP_KEY.split("-")[0], OMETRIA_KEY)


def search(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        hits += [f"{path}: {m}" for m in MARKERS if m.encode() in data]
    return hits


def test_keys_never_leave_the_environment(tmp_path: Path) -> None:
    config = SandboxConfig(
        accounts=[
            AccountSpec(
                client_id="acme", mailchimp_key=MAILCHIMP_KEY, ometria_key=OMETRIA_KEY, lists=[ListSpec(members=1500)]
            )
        ]
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with sandbox_environment(config, tmp_path / "work") as env, patched_environ({"DAGSTER_HOME": str(home)}):
        sb = env.sandbox
        partition = env.partition_keys()[0]
        with DagsterInstance.get() as instance:
            instance.add_dynamic_partitions(MAILCHIMP_LISTS, [partition])
        command = dagster_materialize_command(partition)
        ok = subprocess.run(command, capture_output=True, env=dict(os.environ), timeout=300)
        assert ok.returncode == 0, ok.stderr.decode()[-2000:]
        assert len(sb.ometria_contacts("acme")) > 1000  # the sync really ran with these keys

        sb.revoke("acme", "ometria")  # and a failing run: errors must not carry the key either
        sb.add_member(partition.split(":")[1], "after@example.org")
        failed = subprocess.run(command, capture_output=True, env=dict(os.environ), timeout=300)
        assert failed.returncode != 0
        assert b"403" in failed.stdout + failed.stderr

        output = (ok.stdout + ok.stderr + failed.stdout + failed.stderr).decode(errors="replace")
        assert not [m for m in MARKERS if m in output]
        assert search(home) == []
        assert search(env.data_dir) == []
        with DagsterInstance.get() as instance:
            for run in instance.get_runs():
                assert not [m for m in MARKERS if m in repr(run.tags) + repr(run.run_config)]

        # The sandbox's own error pages do not echo a key either.
        wrong = "0123456789abcdef0123456789abcdef-us6"
        answer = requests.get(f"{sb.mailchimp_url}/lists", auth=("x", wrong), timeout=10)
        assert answer.status_code == 401 and wrong not in answer.text and "0123456789abcdef" not in answer.text
