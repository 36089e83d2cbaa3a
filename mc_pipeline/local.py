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
    config: SandboxConfig, workdir: Path, sandbox: Sandbox | None = None
) -> Iterator[LocalEnvironment]:
    """Start (or reuse) a sandbox and point MC_PIPELINE_CLIENTS, MC_PIPELINE_DATA_DIR and the
    per-client key variables at it for the duration."""
    workdir.mkdir(parents=True, exist_ok=True)
    own = sandbox is None
    sb = sandbox or Sandbox(config).start()
    try:
        registry = workdir / "clients.yaml"
        write_pipeline_files(sb.config, sb.base_url, registry, None)
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
