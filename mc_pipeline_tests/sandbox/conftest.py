"""Fixtures for the sandbox's wire tests.

`sb` is one sandbox shared by the whole session and is only read: tests that change members,
faults, latency or limits build their own (small, so cheap) sandbox with `make_sandbox`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mc_pipeline.sandbox import Sandbox, SandboxConfig

# Two clients, each with a small list and one big enough for every status and the data's mess.
SMALL, BIG = 300, 2500


@pytest.fixture(scope="session")
def sb() -> Iterator[Sandbox]:
    """Read-only: do not mutate members, script faults or change settings on this one."""
    with Sandbox(SandboxConfig.generated(clients=2, lists_per_client=2, members=[SMALL, BIG])) as sandbox:
        yield sandbox


@pytest.fixture(scope="session")
def small_list(sb: Sandbox) -> str:
    return sb.client("client-1").list_ids[0]


@pytest.fixture(scope="session")
def big_list(sb: Sandbox) -> str:
    return sb.client("client-1").list_ids[1]


@pytest.fixture
def make_sandbox() -> Iterator[Callable[..., Sandbox]]:
    """Start sandboxes for one test; all are stopped at its end."""
    started: list[Sandbox] = []

    def make(config: SandboxConfig | None = None, **generated: Any) -> Sandbox:
        cfg = config or SandboxConfig.generated(**generated)
        sandbox = Sandbox(cfg).start()
        started.append(sandbox)
        return sandbox

    yield make
    for sandbox in started:
        sandbox.stop()


@pytest.fixture
def fresh(make_sandbox: Callable[..., Sandbox]) -> Sandbox:
    """A small sandbox a test may change at will: 2 clients x lists of 120 and 60 members."""
    return make_sandbox(clients=2, lists_per_client=2, members=[120, 60])
