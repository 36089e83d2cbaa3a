"""Processes for the benchmarks: the sandbox and every measured worker run in their own process group.

Why separate processes: the pipeline's CPU time and peak RSS must not include the sandbox's
(which generates and serves the members), and a measured worker's figures must not include the
orchestrator's. A worker's CPU and peak RSS come from the kernel (`os.wait4` rusage of exactly
that child), so nothing has to be sampled; psutil sampling is kept only as a cross-check and for
processes that are still alive (the sandbox).

Every process group started here is killed when the orchestrator exits, errors included.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# The settings every scenario shares (see benchmarks/README.md): what a real account meets.
MC_BASE_MS = 250.0  # Mailchimp latency per request
MC_PER_KB_MS = 0.15  # plus this per KiB served: a projected 1000-member page (~630 KiB) adds ~0.095 s
OM_BASE_MS = 60.0  # Ometria latency per push
MC_CONNECTIONS = 10  # Mailchimp: simultaneous requests per account
OM_RATE = 8  # Ometria: requests per second per account
OM_BATCH = 100  # Ometria: records per push
PAGE_SIZE = 1000  # members per Mailchimp page (count=1000)


def page_latency_s(page_bytes: float) -> float:
    """The sandbox's latency for one page of this size: base + per-KiB cost."""
    return (MC_BASE_MS + MC_PER_KB_MS * page_bytes / 1024.0) / 1000.0


def extraction_bound(page_bytes: float) -> float:
    """Members per second one account can be read at: 10 connections x 1000 members per page latency."""
    return MC_CONNECTIONS * PAGE_SIZE / page_latency_s(page_bytes)


IMPORT_BOUND = OM_RATE * OM_BATCH  # records per second per Ometria account


def schedule_s(run: dict[str, Any], latency: float) -> float:
    """How long a fetch's own schedule takes at nominal latency, from what its first requests were: every
    page 10 at a time from the start (since item 7 of issue 11, no request before the pages); a count (no
    member, base latency) and then every page (commit 6bb7403); or the first page alone and then the rest
    (735943c)."""
    pages, waves = run["pages"], math.ceil(run["pages"] / MC_CONNECTIONS)
    if run.get("first_wave", 1) > 1:
        return waves * latency
    if run["requests"] - run["retries"] > pages:
        return MC_BASE_MS / 1000 + waves * latency
    return (1 + math.ceil((pages - 1) / MC_CONNECTIONS)) * latency


def decompose(run: dict[str, Any]) -> dict[str, Any]:
    """One extraction pass over its bound (its own measured page size), and where the rest goes:
    throughput/bound = overlap x latency x slot use, and the ceiling of its schedule (README, 1a)."""
    page_bytes = run["bytes"] / run["fetched"] * 1000  # a full 1000-member page
    bound, latency = extraction_bound(page_bytes), page_latency_s(page_bytes)
    throughput = run["members"] / run["wall_s"]
    return {
        "members": run["members"],
        "pages": run["pages"],
        "requests": run["requests"],
        "first_wave": run.get("first_wave"),
        "wall_s": round(run["wall_s"], 3),
        "page_kib": round(page_bytes / 1024, 1),
        "page_latency_s": round(latency, 4),
        "bound_members_per_s": round(bound),
        "members_per_s": round(throughput),
        "ratio": round(throughput / bound, 3),
        "overlap_factor": round(run["members"] / run["fetched"], 3),
        "latency_factor": round(latency / run["request_s_mean"], 3),
        "slot_use": round(run["request_s_sum"] / (MC_CONNECTIONS * run["wall_s"]), 3),
        "first_page_share": round(run["first_page_s"] / run["wall_s"], 3),
        "schedule_ceiling": round(run["members"] / schedule_s(run, latency) / bound, 3),
        "client_cpu_ms_per_page": round(run["cpu_s"] / run["pages"] * 1000, 2),
        "client_cpu_us_per_member": round(run["cpu_s"] / run["fetched"] * 1e6, 2),
        "retries": run["retries"],
        "throttled": run["throttled"],
    }


# ------------------------------------------------------------------------------------ process groups
_groups: set[int] = set()


def _kill_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the group, then SIGKILL whatever is left after `grace_s`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    _groups.discard(pgid)


def kill_all() -> None:
    """End every process group this process started (by their own ids, nothing else)."""
    for pgid in list(_groups):
        _kill_group(pgid, grace_s=5.0)


def _on_signal(signum: int, _frame: Any) -> None:
    kill_all()
    raise SystemExit(128 + signum)


atexit.register(kill_all)
for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


def spawn(args: list[str], *, env: dict[str, str] | None = None, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A child in a new session (so its whole group can be killed), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    _groups.add(proc.pid)
    return proc


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    _kill_group(proc.pid, grace_s)
    with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
        proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------ the sandbox
def sandbox_config(
    accounts: dict[str, list[int]],
    *,
    om_rate: int = OM_RATE,
    om_drain_per_s: float | None = None,
    om_backlog: int | None = None,
    mc_latency: bool = True,
    seed: int = 7,
) -> dict[str, Any]:
    """A `SandboxConfig` document: {client_id: [list sizes]}, with the realistic latencies."""
    ometria: dict[str, Any] = {"rate_per_second": om_rate, "latency": {"base_ms": OM_BASE_MS}}
    if om_drain_per_s is not None:
        ometria["drain_per_second"] = om_drain_per_s
    if om_backlog is not None:
        ometria["backlog_limit"] = om_backlog
    return {
        "seed": seed,
        "mailchimp": {
            "max_in_flight": MC_CONNECTIONS,
            "latency": {"base_ms": MC_BASE_MS, "per_kb_ms": MC_PER_KB_MS} if mc_latency else {},
        },
        "ometria": ometria,
        "accounts": [{"client_id": cid, "lists": [{"members": n} for n in sizes]} for cid, sizes in accounts.items()],
    }


@dataclass
class Sandbox:
    proc: subprocess.Popen
    base_url: str
    registry: Path
    keys: dict[str, str]  # the key variables the registry names
    log: Path
    startup_s: float
    registry_doc: dict[str, Any] = field(default_factory=dict)

    def lists(self, client_id: str) -> list[str]:
        return next(c["lists"] for c in self.registry_doc["clients"] if c["id"] == client_id)

    def mailchimp_key(self, client_id: str) -> str:
        entry = next(c for c in self.registry_doc["clients"] if c["id"] == client_id)
        return self.keys[entry["mailchimp"]["api_key"]["env"]]

    def stats(self) -> dict[str, Any]:
        return requests.get(f"{self.base_url}/_sandbox/stats", timeout=30).json()

    def requests_by_label(self) -> dict[str, dict[str, Any]]:
        return self.stats()["keys"]

    def cpu_s(self) -> float:
        """The sandbox process's CPU (all threads), for the machine's CPU budget."""
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def rss_mib(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def env(self, data_dir: Path) -> dict[str, str]:
        """What a pipeline process needs to reach this sandbox."""
        return {**self.keys, "MC_PIPELINE_CLIENTS": str(self.registry), "MC_PIPELINE_DATA_DIR": str(data_dir)}


@contextmanager
def sandbox(
    config: dict[str, Any],
    workdir: Path,
    *,
    ometria_requests_per_second: float | None = None,
    start_timeout_s: float = 900.0,
) -> Iterator[Sandbox]:
    """`mc-pipeline sandbox --config <generated yaml>` as its own process (group); killed on exit.

    `ometria_requests_per_second` is written into every registry entry (an Ometria plan with a
    higher push limit), for runs that must not wait on the default 8 per second.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, registry, env_file, log = (workdir / n for n in ("sandbox.yaml", "clients.yaml", "sandbox.env", "sandbox.log"))
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    log.unlink(missing_ok=True)
    port = free_port()
    args = [PY, "-m", "mc_pipeline.cli", "sandbox", "--config", str(cfg), "--port", str(port)]
    args += ["--write-registry", str(registry), "--write-env", str(env_file)]
    started = time.perf_counter()
    proc = spawn(args, log=log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the sandbox exited with {proc.returncode}:\n{tail(log)}")
            with contextlib.suppress(requests.ConnectionError, requests.Timeout):
                if requests.get(f"{base_url}/_sandbox/health", timeout=1).ok:
                    break
            if time.perf_counter() - started > start_timeout_s:
                raise RuntimeError(f"the sandbox was not healthy after {start_timeout_s:.0f}s:\n{tail(log)}")
            time.sleep(0.2)
        keys = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        doc = yaml.safe_load(registry.read_text())
        if ometria_requests_per_second is not None:
            for entry in doc["clients"]:
                entry["ometria"]["requests_per_second"] = ometria_requests_per_second
            registry.write_text(yaml.safe_dump(doc, sort_keys=False))
        yield Sandbox(proc, base_url, registry, keys, log, time.perf_counter() - started, doc)
    finally:
        stop(proc)


# ------------------------------------------------------------------------------------ measured workers
@dataclass
class WorkerResult:
    """One worker process: what it reported, and what the kernel says it cost."""

    task: str
    returncode: int
    wall_s: float
    cpu_s: float  # user + system of the process and the children it waited for (rusage)
    maxrss_mib: float  # the kernel's peak resident set (ru_maxrss)
    sampled_peak_rss_mib: float  # psutil polling, a cross-check
    output: dict[str, Any]
    rss_timeline: list[tuple[float, float]] = field(default_factory=list)  # (epoch, MiB), every ~0.25 s

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "process_cpu_s": round(self.cpu_s, 3),
            "peak_rss_mib": round(self.maxrss_mib, 1),
            "sampled_peak_rss_mib": round(self.sampled_peak_rss_mib, 1),
        }


@dataclass
class Worker:
    task: str
    proc: subprocess.Popen
    out: Path
    log: Path
    started: float
    timeout_s: float
    ready: Path | None = None
    _peak: float = 0.0
    _timeline: list[tuple[float, float]] = field(default_factory=list)

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            rss = psutil.Process(self.proc.pid).memory_info().rss / 2**20
            self._peak = max(self._peak, rss)
            now = time.time()
            if not self._timeline or now - self._timeline[-1][0] >= 0.25 or rss > self._timeline[-1][1] + 16:
                self._timeline.append((round(now, 2), round(rss, 1)))

    def is_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.task} exited early:\n{tail(self.log)}")
        return self.ready is not None and self.ready.exists()

    def finish(self) -> WorkerResult:
        """Reap the worker with wait4 (its own rusage), sampling its RSS meanwhile."""
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            self.sample()
            if time.monotonic() - self.started > self.timeout_s:
                _kill_group(self.proc.pid, 5.0)
                raise TimeoutError(f"worker {self.task} still running after {self.timeout_s:.0f}s:\n{tail(self.log)}")
            time.sleep(0.05)
        wall = time.monotonic() - self.started
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        _kill_group(self.proc.pid, 2.0)  # anything it left behind in its group
        if self.proc.returncode != 0 or not self.out.exists():
            raise RuntimeError(f"worker {self.task} failed ({self.proc.returncode}):\n{tail(self.log, 60)}")
        return WorkerResult(
            self.task,
            self.proc.returncode,
            wall,
            usage.ru_utime + usage.ru_stime,
            usage.ru_maxrss / 1024.0,  # KiB on Linux
            self._peak,
            json.loads(self.out.read_text()),
            self._timeline,
        )


def start_worker(
    task: str,
    args: dict[str, Any],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    name: str | None = None,
    timeout_s: float = 1800.0,
    barrier: bool = False,
    cwd: Path = REPO,
) -> Worker:
    """`python -m benchmarks.workers TASK args.json out.json` in its own process group.

    `cwd` is where `mc_pipeline` is imported from (a checkout of another commit: benchmarks/bound.py).
    With `barrier`, the worker touches a ready file once set up (imports done, data loaded) and
    then waits for `release()`, so concurrent workers start their measured work together.
    """
    name = name or task
    workdir.mkdir(parents=True, exist_ok=True)
    args_path, out, log = workdir / f"{name}.args.json", workdir / f"{name}.out.json", workdir / f"{name}.log"
    for p in (out, log):
        p.unlink(missing_ok=True)
    ready = workdir / f"{name}.ready" if barrier else None
    if barrier:
        ready.unlink(missing_ok=True)
        (workdir / "go").unlink(missing_ok=True)  # released together by `release()`
        args = {**args, "ready_file": str(ready), "go_file": str(workdir / "go")}
    args_path.write_text(json.dumps(args, indent=1))
    proc = spawn([PY, "-m", "benchmarks.workers", task, str(args_path), str(out)], env=env, log=log, cwd=cwd)
    return Worker(task, proc, out, log, time.monotonic(), timeout_s, ready)


def run_worker(task: str, args: dict[str, Any], workdir: Path, **kw: Any) -> WorkerResult:
    return start_worker(task, args, workdir, **kw).finish()


def release(workers: list[Worker], workdir: Path, timeout_s: float = 600.0) -> float:
    """Wait until every worker is ready, then let them all go at once; returns the go time (epoch)."""
    deadline = time.monotonic() + timeout_s
    while not all(w.is_ready() for w in workers):
        for w in workers:
            w.sample()
        if time.monotonic() > deadline:
            raise TimeoutError("workers not ready in time")
        time.sleep(0.05)
    go = workdir / "go"
    now = time.time()
    go.write_text(str(now))
    return now
