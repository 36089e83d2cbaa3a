"""Shared fixtures: a sandbox-backed pipeline environment and Dagster instances (SQLite, PostgreSQL)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test

from mc_pipeline.local import LocalEnvironment, sandbox_environment
from mc_pipeline.sandbox import SandboxConfig

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    with instance_for_test(temp_dir=str(home)) as inst:
        yield inst


def make_env(tmp_path: Path, **generated: object) -> object:
    config = SandboxConfig.generated(**generated)  # type: ignore[arg-type]
    return sandbox_environment(config, tmp_path / "work")


@pytest.fixture
def small_env(tmp_path: Path) -> Iterator[LocalEnvironment]:
    """One client, two lists (1,200 and 2,600 members): pages of 1000 make both multi-page."""
    with sandbox_environment(
        SandboxConfig.generated(clients=1, lists_per_client=2, members=[1200, 2600]), tmp_path / "work"
    ) as env:
        yield env
