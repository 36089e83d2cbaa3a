"""Scenario 6: a cycle of many small lists, 5% changed, through the real daemon on PostgreSQL (issue 11).

The change-aware schedule (automation/probes.py) probes each list once a cycle at its own slot,
runs only the changed ones and records a verification for the others. Measured here, in order:

- A private PostgreSQL 15 cluster (benchmarks/pg_private.py), so its CPU is this scenario's.
- Synced state, recorded directly: `record_imports` (what a full import records per list: its
  watermark and destination), written in batches of 500 (10,000 lists in seconds), no initial syncs.
- The daemon starts with a compressed promise (`MC_PIPELINE_VERIFY_EVERY_MIN`, e.g. 20, ticking
  every 2 minutes: a probe cycle of 16 minutes in 8 ticks, against 50 minutes in 10 ticks of 5 for
  the hourly promise). Its first tick is a warm-up, outside the window; then a new member is added
  to every 20th list (one list in a quarter of the accounts) and the window is the next cycle:
  every list probed once, the changed ones run. The schedule is stopped after the cycle's last tick.
- Then an idle baseline: the daemon up, no list due (the schedule stopped), for the fixed costs.

CPU: the daemon, its code servers and every run worker (psutil over the tree plus each process's
exit record, benchmarks/_hook/sitecustomize.py); the PostgreSQL cluster (every process of it, and
the backends it reaped); and per process role, each session's backend CPU (read by the hook as
the session closes). The split into fixed costs, probes and runs: benchmarks/many_lists_figures.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import requests

from benchmarks.harness import PY, REPO, free_port, sandbox, sandbox_config, spawn, stop
from benchmarks.pg_private import Cluster, private_cluster
from benchmarks.scenarios import Context

HOOK = Path(__file__).resolve().parent / "_hook"
SUMMARY = re.compile(
    r"^(?:\x1b\[\d+m)?(\d{4}-\d\d-\d\d \d\d:\d\d):\d\d \+0000.*hourly_incremental_sync - (\d+) lists due: "
    r"(\d+) verified unchanged, (\d+) runs requested, (\d+) still syncing, (\d+) deferred .*?, (\d+) caught up, "
    r".*?; (\d+) Mailchimp calls; ([\d.]+)s .*?, ([\d.]+)s CPU"
)
FIELDS = ("due", "verified", "runs_requested", "busy", "deferred", "caught_up", "calls", "seconds", "cpu_s")


def tree_cpu(roots: list[int]) -> dict[int, tuple[float, str]]:
    """CPU seconds and role of some processes and their live descendants, by pid."""
    from benchmarks._hook.sitecustomize import role_of

    out = {}
    procs = []
    for root in roots:
        with contextlib.suppress(psutil.Error):
            procs += [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    for proc in procs:
        try:
            t = proc.cpu_times()
            out[proc.pid] = (t.user + t.system, role_of(proc.cmdline()))
        except psutil.Error:
            pass
    return out


class Admin:
    """One session on the `postgres` database for the counters, its own backend's CPU known."""

    def __init__(self, pg: Cluster) -> None:
        import psycopg2  # type: ignore[import-untyped]

        from benchmarks._hook.sitecustomize import backend_cpu_ns

        self.conn = psycopg2.connect(pg.dsn + " dbname=postgres")
        self.conn.autocommit = True
        self._cpu = lambda: (backend_cpu_ns(self.conn.info.backend_pid) or 0) / 1e9

    def execute(self, sql: str) -> None:
        self.conn.cursor().execute(sql)

    def snapshot(self, db: str, pg: Cluster, roots: list[int]) -> dict[str, Any]:
        time.sleep(1.5)  # PostgreSQL 15 flushes a backend's counters within a second
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT sessions, xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (db,))
            sessions, xacts = cur.fetchone()
        tree = tree_cpu(roots)
        return {
            "t": time.time(),
            "pg_cpu_s": pg.cpu_s(),
            "admin_cpu_s": self._cpu(),
            "sessions": int(sessions),
            "transactions": int(xacts),
            "tree": {str(pid): list(v) for pid, v in tree.items()},
        }


def _instance(home: Path, db: str, pg: Cluster) -> dict[str, str]:
    """The deployment's dagster.yaml (deploy/: its run queue, retries, run monitoring), its
    database the private cluster's; the environment it reads that from."""
    text = (REPO / "deploy" / "dagster.yaml").read_text()
    (home / "dagster.yaml").write_text(text.replace("/opt/dagster/logs/compute", str(home / "compute")))
    return {
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(pg.port),
        "DAGSTER_PG_USER": "postgres",
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_PG_DB": db,
    }


def tick_summaries(log: Path) -> list[dict[str, Any]]:
    """The schedule's own summary of each tick it evaluated (automation/probes.py TickReport.summary)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if m := SUMMARY.match(line):
            values = [float(g) if "." in g else int(g) for g in m.groups()[1:]]
            out.append({"tick": m.group(1), **dict(zip(FIELDS, values, strict=True))})
    return out


def _stop_schedule(instance: Any) -> bool:
    """Stop `hourly_incremental_sync` as the UI does (a STOPPED state over the code's default)."""
    from dagster._core.scheduler.instigation import InstigatorStatus, InstigatorType

    for state in instance.all_instigator_state(instigator_type=InstigatorType.SCHEDULE):
        if state.instigator_name == "hourly_incremental_sync":
            instance.update_instigator_state(state.with_status(InstigatorStatus.STOPPED))
            return True
    return False


def _record_synced_state(instance: Any, sb: Any, keys: list[str]) -> datetime:
    """What a full import of every list leaves, recorded directly (no initial syncs), in batches."""
    from mc_pipeline.assets.watermarks import destination_of, record_imports
    from mc_pipeline.partitions import MAILCHIMP_LISTS
    from mc_pipeline.registry import YamlClientRegistry, parse_partition_key

    registry = YamlClientRegistry(sb.registry)
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, keys)
    watermark = datetime.fromisoformat(requests.get(f"{sb.base_url}/_sandbox/clock", timeout=30).json()["now"])
    clients = {c.id: c for c in registry.clients()}
    imports = {}
    for key in keys:
        client_id, list_id = parse_partition_key(key)
        imports[key] = (watermark, destination_of(clients[client_id], list_id))
    record_imports(instance, imports)
    return watermark


@contextlib.contextmanager
def code_server(work: Path, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`dagster code-server start -m mc_pipeline.definitions`, as the deployment runs it (its
    user_code service), and a workspace.yaml for the daemon: the daemon then reconnects to it
    every minute instead of starting a code server of its own each time."""
    port = free_port()
    log = work / "code_server.log"
    proc = spawn(
        [
            PY,
            "-m",
            "dagster",
            "code-server",
            "start",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-m",
            "mc_pipeline.definitions",
        ],
        log=log,
        env=env,
    )
    workspace = work / "workspace.yaml"
    workspace.write_text(
        f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {port}\n      location_name: mc_pipeline\n"
    )
    try:
        deadline = time.monotonic() + 120
        while not _serving(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the code server did not start; see {log}")
            time.sleep(0.5)
        yield proc, workspace
    finally:
        stop(proc)


def _serving(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(log: Path, daemon: Any, until: Any, deadline: datetime, what: str) -> Any:
    while not (found := until()):
        if datetime.now(UTC) > deadline or daemon.poll() is not None:
            raise RuntimeError(f"{what}: not by {deadline:%H:%M:%S}; see {log}")
        time.sleep(1.0)
    return found


def run_many_lists(ctx: Context) -> dict[str, Any]:
    from dagster import DagsterInstance, RunsFilter

    from benchmarks._hook.sitecustomize import account_sessions
    from benchmarks.many_lists_figures import figures
    from mc_pipeline.assets.watermarks import latest_events
    from mc_pipeline.local import dagster_daemon, patched_environ
    from mc_pipeline.registry import parse_partition_key
    from mc_pipeline.tags import RUN_PID, SYNC_KIND

    p = ctx.plan
    work = ctx.dir("6_many_lists")
    home, procs_dir, log = work / "dagster_home", work / "procs", work / "code_server.log"
    for old in (home, work / "data", procs_dir):
        shutil.rmtree(old, ignore_errors=True)
    for old_log in ("daemon.log", "code_server.log"):
        (work / old_log).unlink(missing_ok=True)
    home.mkdir()
    procs_dir.mkdir()
    tick = timedelta(minutes=p.lists_tick_min)
    cycle_ticks = (p.lists_every_min - 2 * p.lists_tick_min) // p.lists_tick_min
    clients = {f"acct-{i + 1:04d}": [p.lists_members] * p.lists_per_client for i in range(p.lists_clients)}
    db = f"mc_pipeline_bench6_{uuid.uuid4().hex[:8]}"
    raw: dict[str, Any] = {"plan": {k: v for k, v in p.__dict__.items() if k.startswith("lists_")}}
    with private_cluster() as pg, sandbox(sandbox_config(clients), work / "sandbox") as sb:
        admin = Admin(pg)
        admin.execute(f'CREATE DATABASE "{db}"')
        raw["postgres"] = "private cluster" if pg.private else "the machine's shared server (an upper bound)"
        env = {**sb.env(work / "data"), **_instance(home, db, pg), "DAGSTER_HOME": str(home)}
        keys = [f"{c}:{lid}" for c in clients for lid in sb.lists(c)]
        changed = keys[:: p.lists_changed_every]
        changed_accounts = {parse_partition_key(k)[0] for k in changed}
        raw.update(keys=keys, changed=changed, clean_accounts=sorted(set(clients) - changed_accounts))
        remove_hook = account_sessions(str(procs_dir), "harness")
        daemon_env = {
            **env,
            "MC_PIPELINE_VERIFY_EVERY_MIN": str(p.lists_every_min),
            "MC_PIPELINE_PROBE_TICK_MIN": str(p.lists_tick_min),
            "MC_PIPELINE_INCREMENTAL_CRON": "",
            "MC_BENCH_PROC_LOG": str(procs_dir),
            "PYTHONPATH": os.pathsep.join([str(HOOK), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        try:
            while datetime.now(UTC).second >= 5:  # recorded early in a minute: the first tick takes no list as deferred
                time.sleep(0.5)
            with patched_environ(env), DagsterInstance.from_config(str(home)) as instance:
                t0 = time.monotonic()
                raw["watermark"] = _record_synced_state(instance, sb, keys).isoformat()
                raw["record_synced_state_s"] = time.monotonic() - t0
                ctx.log(f"  synced state of {len(keys)} lists recorded directly in {raw['record_synced_state_s']:.1f}s")
            with (
                patched_environ(env),
                DagsterInstance.from_config(str(home)) as instance,
                code_server(work, {**os.environ, **daemon_env}) as (server, workspace),
                dagster_daemon(work / "daemon.log", daemon_env, "-w", str(workspace)) as daemon,
            ):
                roots = [daemon.pid, server.pid]
                start = datetime.now(UTC)
                warm = _wait(log, daemon, lambda: tick_summaries(log), start + timedelta(minutes=10), "a first tick")
                first = datetime.strptime(warm[0]["tick"], "%Y-%m-%d %H:%M").replace(tzinfo=UTC) + tick
                ticks = [first + tick * i for i in range(cycle_ticks)]
                for i, key in enumerate(changed):  # after the warm-up tick's probes: changed since their watermark
                    requests.post(
                        f"{sb.base_url}/_sandbox/mailchimp/lists/{parse_partition_key(key)[1]}/members",
                        json={"email_address": f"bench6-new-{i}@example.com"},
                        timeout=30,
                    ).raise_for_status()
                ctx.log(f"  {len(changed)} lists changed; the window: ticks {first:%H:%M}..{ticks[-1]:%H:%M} UTC")
                while datetime.now(UTC) < first - timedelta(seconds=8):
                    time.sleep(0.5)
                s0, mc0 = admin.snapshot(db, pg, roots), sb.requests_by_label()
                in_window = RunsFilter(created_after=first - timedelta(seconds=5))
                last = ticks[-1].strftime("%Y-%m-%d %H:%M")
                _wait(
                    log,
                    daemon,
                    lambda: any(t["tick"] == last for t in tick_summaries(log)) and _stop_schedule(instance),
                    ticks[-1] + timedelta(minutes=5),
                    "the cycle's last tick",
                )

                def over() -> bool:
                    ended = ("SUCCESS", "FAILURE", "CANCELED")
                    runs = instance.get_run_records(filters=in_window)
                    return datetime.now(UTC) > ticks[-1] + timedelta(seconds=30) and all(
                        x.dagster_run.status.value in ended for x in runs
                    )

                _wait(log, daemon, over, ticks[-1] + timedelta(minutes=30), "the window's runs")
                s1, mc1 = admin.snapshot(db, pg, roots), sb.requests_by_label()
                baseline_s = p.lists_baseline_s
                ctx.log(f"  window over ({s1['t'] - s0['t']:.0f}s); idle baseline for {baseline_s}s")
                time.sleep(baseline_s)
                s2 = admin.snapshot(db, pg, roots)
                raw["roots"] = roots
                events = latest_events(instance, set(keys))
                records = instance.get_run_records(filters=in_window)
        finally:
            remove_hook()
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            admin.conn.close()
    raw.update(
        ticks=[t.isoformat() for t in ticks],
        tick_s=tick.total_seconds(),
        snapshots=[s0, s1, s2],
        mailchimp={
            "window": _requests(mc1) - _requests(mc0),
            "clean_accounts": _requests(mc1, raw["clean_accounts"]) - _requests(mc0, raw["clean_accounts"]),
        },
        summaries=tick_summaries(log),
        processes=[json.loads(f.read_text()) for f in procs_dir.glob("*.json")],
        sessions=_session_lines(procs_dir),
        runs=[
            {
                "kind": x.dagster_run.tags.get(SYNC_KIND, x.dagster_run.job_name),
                "partition": x.dagster_run.tags.get("dagster/partition"),
                "pid": x.dagster_run.tags.get(RUN_PID),
                "status": x.dagster_run.status.value,
                "created": x.create_timestamp.timestamp(),
                "ended": x.end_time,
            }
            for x in records
        ],
        events={
            k: {
                "imported": imp.timestamp,
                "verified": v.timestamp if v else None,
                "verified_at": v.asset_observation.metadata["verified_at"].value if v else None,
            }
            for k, (imp, v) in events.items()
        },
    )
    (work / "raw.json").write_text(json.dumps(raw))
    return figures(raw)


def _session_lines(procs_dir: Path) -> dict[str, list[tuple[float, int]]]:
    """Per process (`role-pid`), each closed session's (time, backend CPU ns)."""
    out = {}
    for f in procs_dir.glob("pg-*.log"):
        rows = [line.split() for line in f.read_text().splitlines()]
        out[f.stem[3:]] = [(float(t), int(ns)) for t, ns in rows if t and ns]
    return out


def _requests(stats: dict[str, Any], accounts: list[str] | None = None) -> int:
    return sum(
        v["requests"]
        for k, v in stats.items()
        if k.startswith("mailchimp:") and (accounts is None or k.split(":", 1)[1] in accounts)
    )
