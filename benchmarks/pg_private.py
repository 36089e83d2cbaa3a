"""A private PostgreSQL 15 cluster for one benchmark, so its server's CPU is the benchmark's alone.

The machine's server (127.0.0.1:5432) is shared with other work (tests of other sessions), so the
CPU of its processes over a window is only an upper bound of the benchmark's. This starts a
cluster of the same binaries on a free port for the scenario, with the machine's settings that
matter for the cost of a write (fsync and synchronous_commit on, 128 MB of shared buffers,
autovacuum off as on the machine's server), and stops it after. Its processes are the
postmaster's tree: the postmaster (which forks a backend per session), the background processes,
and the backends, whose CPU the postmaster collects as they exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path("/usr/lib/postgresql/15/bin")
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "on",
    "synchronous_commit": "on",
    "shared_buffers": "128MB",
    "autovacuum": "off",
    "max_connections": "100",
}


@dataclass(frozen=True)
class Cluster:
    port: int
    postmaster: int  # pid
    private: bool  # False: the machine's shared server (no initdb here)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres"

    def cpu_s(self) -> float:
        """CPU of every process of the server so far: live ones, and the backends already reaped."""
        try:
            pm = psutil.Process(self.postmaster)
            t = pm.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in pm.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system
            return total
        except psutil.Error:
            return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextlib.contextmanager
def private_cluster() -> Iterator[Cluster]:
    """A fresh cluster for the block; the machine's server if PostgreSQL's binaries are not here."""
    if not (BIN / "initdb").exists():
        yield Cluster(5432, _shared_postmaster(), private=False)
        return
    root = Path(tempfile.mkdtemp(prefix="mc_bench_pg_"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    port = _free_port()
    options = " ".join([f"-p {port}", f"-k {root}", *(f"-c {k}={v}" for k, v in SETTINGS.items())])
    pg_ctl = [str(BIN / "pg_ctl"), "-D", str(data)]
    try:
        initdb = [str(BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
        subprocess.run(_as_postgres(initdb), check=True, capture_output=True)
        start = [*pg_ctl, "-o", options, "-l", str(root / "log"), "-w", "start"]
        subprocess.run(_as_postgres(start), check=True, capture_output=True)
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield Cluster(port, pid, private=True)
    finally:
        subprocess.run(_as_postgres([*pg_ctl, "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _shared_postmaster() -> int:
    for p in psutil.process_iter(["name", "ppid"]):
        if (p.info["name"] or "").startswith("postgres") and p.info["ppid"] == 1:
            return int(p.pid)
    raise RuntimeError("no PostgreSQL server found")
