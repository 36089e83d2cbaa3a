"""Shared fixtures: a sandbox-backed pipeline environment and Dagster instances (SQLite, PostgreSQL)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, instance_for_test

from mc_pipeline.local import LocalEnvironment, sandbox_environment
from mc_pipeline.resources.paging import OUR_CLOCK
from mc_pipeline.sandbox import SandboxConfig
from mc_pipeline_tests.helpers import set_ometria_rate

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _our_clock() -> Iterator[None]:
    """`settle` moves our clock with the sandbox's; each test starts from the machine's."""
    OUR_CLOCK.offset_s = 0.0
    yield
    OUR_CLOCK.offset_s = 0.0


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    with instance_for_test(temp_dir=str(home)) as inst:
        yield inst


def make_env(tmp_path: Path, **generated: Any) -> AbstractContextManager[LocalEnvironment]:
    config = SandboxConfig.generated(**generated)
    return sandbox_environment(config, tmp_path / "work")


@pytest.fixture
def small_env(tmp_path: Path) -> Iterator[LocalEnvironment]:
    """One client, two lists (1,200 and 2,600 members): pages of 1000 make both multi-page.

    Ometria at a raised plan limit (100 pushes a second, not 8): few tests have the rate as their
    subject, and at 8 a second a full sync of the larger list waits 3.4 s on it.
    """
    with sandbox_environment(
        SandboxConfig.generated(clients=1, lists_per_client=2, members=[1200, 2600]), tmp_path / "work"
    ) as env:
        set_ometria_rate(env)
        yield env


PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database on the local server, dropped afterwards.

    Unreachable PostgreSQL fails the test under CI (CI=true) and skips it elsewhere.
    """
    import uuid

    import psycopg2

    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    except psycopg2.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required under CI: {exc}")
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 unreachable: {exc}")
    admin.autocommit = True
    name = f"mc_pipeline_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture
def pg_instance(pg_database: str, tmp_path: Path) -> Iterator[DagsterInstance]:
    """A DagsterInstance whose run, event log and schedule storage are that PostgreSQL database."""
    home = tmp_path / "pg_dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_db:\n"
        f"      hostname: {PG['host']}\n      port: {PG['port']}\n      username: {PG['user']}\n"
        f"      password: ''\n      db_name: {pg_database}\n"
        # SQLAlchemy 2.1 maps postgresql:// to psycopg 3; dagster-postgres ships psycopg2.
        "      scheme: postgresql+psycopg2\n"
        "telemetry:\n  enabled: false\n"
    )
    instance = DagsterInstance.from_config(str(home))
    try:
        yield instance
    finally:
        instance.dispose()


SLOW_MODULES = ("test_crash", "test_end_to_end_pg", "test_dagster_cli")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers from what a test uses, so none is forgotten: `-m "not slow and not daemon"` is the fast set.

    The daemon tests share one xdist group (`--dist loadgroup`): each runs a dagster-daemon and its
    run workers, and two at once on a small machine would stretch the latencies they measure.
    """
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        fixtures = getattr(item, "fixturenames", ())
        if module == "test_daemon":
            item.add_marker(pytest.mark.daemon)
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.xdist_group("daemon"))
        if "pg_database" in fixtures or "pg_instance" in fixtures:
            item.add_marker(pytest.mark.postgres)
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
