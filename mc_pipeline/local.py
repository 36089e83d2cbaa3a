"""A pipeline pointed at an in-process sandbox: registry, keys and data dir in one folder.

The demo, the end-to-end tests and the benchmarks all start here, so they exercise exactly
the configuration a user gets from `mc-pipeline sandbox --write-registry`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mc_pipeline.sandbox import Sandbox, SandboxConfig
from mc_pipeline.sandbox.registry import key_environment, write_pipeline_files


@contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class LocalEnvironment:
    sandbox: Sandbox
    workdir: Path
    registry: Path
    data_dir: Path

    def partition_keys(self) -> list[str]:
        return [f"{c.client_id}:{lid}" for c in self.sandbox.clients() for lid in c.list_ids]


@contextmanager
def sandbox_environment(
    config: SandboxConfig, workdir: Path, sandbox: Sandbox | None = None, env_file: Path | None = None
) -> Iterator[LocalEnvironment]:
    """Start (or reuse) a sandbox and point MC_PIPELINE_CLIENTS, MC_PIPELINE_DATA_DIR and the
    per-client key variables at it for the duration; `env_file` also gets the keys (mode 600)."""
    workdir.mkdir(parents=True, exist_ok=True)
    own = sandbox is None
    sb = sandbox or Sandbox(config).start()
    try:
        registry = workdir / "clients.yaml"
        write_pipeline_files(sb.config, sb.base_url, registry, env_file)
        data_dir = workdir / "data"
        env = {
            **key_environment(sb.config),
            "MC_PIPELINE_CLIENTS": str(registry),
            "MC_PIPELINE_DATA_DIR": str(data_dir),
        }
        with patched_environ(env):
            yield LocalEnvironment(sandbox=sb, workdir=workdir, registry=registry, data_dir=data_dir)
    finally:
        if own:
            sb.stop()


def expected_contacts(sb: Sandbox, list_id: str) -> dict[str, dict]:
    """What Ometria should hold for a list: every member, archived ones included (opted out), by contact id."""
    return {m["contact_id"]: m for m in sb.mailchimp_list(list_id).members(include_archived=True)}


def ometria_differences(sb: Sandbox, client_id: str, list_id: str, collection: str) -> list[str]:
    """Where the sandbox's Ometria differs from Mailchimp for one list; empty when they agree."""
    from mc_pipeline.transform import OPTIN

    held = sb.ometria_contacts(client_id, collection)
    expected = expected_contacts(sb, list_id)
    problems = []
    missing, extra = set(expected) - set(held), set(held) - set(expected)
    if missing:
        problems.append(f"{len(missing)} contacts missing from Ometria")
    live_extra = [cid for cid in extra if held[cid].get("marketing_optin") != "EXPLICITLY_OPTEDOUT"]
    if live_extra:  # an opted-out extra is a member Mailchimp deleted: that is how it should end
        problems.append(f"{len(live_extra)} contacts in Ometria, not opted out, that Mailchimp does not list")
    wrong = [
        cid
        for cid, m in expected.items()
        if cid in held
        and (
            held[cid].get("email") != m["email_address"].strip()
            or held[cid].get("marketing_optin") != OPTIN[m["status"]]
        )
    ]
    if wrong:
        problems.append(f"{len(wrong)} contacts with a stale email or opt-in")
    return problems


def local_instance_yaml(max_concurrent_runs: int = 4) -> str:
    """A SQLite instance with the production run queue: one run at a time per partition and per account."""
    from mc_pipeline.tags import LIMITED_TAGS

    limits = "".join(
        f"      - key: {key}\n        value: {{applyLimitPerUniqueValue: true}}\n        limit: 1\n"
        for key in LIMITED_TAGS
    )
    return (
        "run_coordinator:\n"
        "  module: dagster._core.run_coordinator\n"
        "  class: QueuedRunCoordinator\n"
        "  config:\n"
        f"    max_concurrent_runs: {max_concurrent_runs}\n"
        "    dequeue_interval_seconds: 1\n"
        "    tag_concurrency_limits:\n"
        f"{limits}"
        "telemetry:\n  enabled: false\n"
    )


@contextmanager
def dagster_daemon(log_path: Path, env: Mapping[str, str] | None = None, *target: str) -> Iterator[object]:
    """`dagster-daemon run` as a subprocess (schedules, sensors, run queue, launcher) until the block ends.

    `target` is how it finds the code: by default `-m mc_pipeline.definitions`; a deployment
    passes `-w workspace.yaml` to reach a code server instead.
    """
    import shutil
    import signal
    import subprocess
    import sys

    exe = shutil.which("dagster-daemon", path=str(Path(sys.executable).parent)) or "dagster-daemon"
    args = [exe, "run", *(target or ("-m", "mc_pipeline.definitions"))]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
