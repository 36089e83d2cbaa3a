"""Scenario 6: an hour of many small lists, 5% changed, through the real daemon on PostgreSQL (issue 11).

The change-aware schedule (automation/probes.py) probes each list once a cycle at its own slot,
runs only the changed ones and records a verification for the others. Measured here:

- Synced state, recorded directly: a `record_import` per list (what a full import records: its
  watermark and destination, on the sandbox's clock), no initial syncs. Then a new member is
  added to every 20th list (one list in each of a quarter of the accounts) through the sandbox.
- The hour, compressed: the daemon's code runs with `MC_PIPELINE_VERIFY_EVERY_MIN=5` and
  `MC_PIPELINE_PROBE_TICK_MIN=1`, so each list is probed once in 5 minutes (ticks each minute:
  a fifth of the lists per tick, 2.4x as many per tick as the hourly cadence's twelfth). Per-list
  work is the same as in an hour; fixed costs (the daemon's loops, code-server reloads) are
  counted for 5 minutes only, and the busy share over the window is that of work 12x denser.
- Processes: the sandbox in its own process (not counted: it stands for Mailchimp and Ometria);
  the daemon, its code servers and every run worker (psutil over the tree, plus the exit record of
  each short-lived process, benchmarks/_hook/sitecustomize.py); the PostgreSQL server (psutil over
  every `postgres` process, plus the postmaster's reaped children: the backends of closed sessions).
  PostgreSQL is shared by the machine, so its figure is an upper bound.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import requests

from benchmarks.harness import REPO, sandbox, sandbox_config
from benchmarks.scenarios import Context, figure, r

HOOK = Path(__file__).resolve().parent / "_hook"
PG = "host=127.0.0.1 port=5432 user=postgres"
MAX_CONCURRENT_RUNS = 8  # as the production dagster.yaml
CYCLE_MIN, TICK_MIN = 5, 1  # the compressed hour
COMPRESSION = 60 // CYCLE_MIN


def _tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of a process and its live descendants, by pid."""
    out = {}
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return out
    for proc in procs:
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _postgres_cpu() -> float:
    """Every postgres process's CPU, and the postmaster's reaped children (backends that exited)."""
    total = 0.0
    for p in psutil.process_iter(["name", "ppid"]):
        if p.info["name"] and p.info["name"].startswith("postgres"):
            try:
                t = p.cpu_times()
                total += t.user + t.system
                if p.info["ppid"] == 1 or not (p.parent() and (p.parent().name() or "").startswith("postgres")):
                    total += t.children_user + t.children_system
            except psutil.Error:
                pass
    return total


def _pg_stats(db: str) -> dict[str, int]:
    import psycopg2  # type: ignore[import-untyped]

    time.sleep(1.5)  # PostgreSQL 15 flushes a backend's counters within a second
    with psycopg2.connect(PG + " dbname=postgres") as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT sessions, xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (db,))
        sessions, xacts = cur.fetchone()
    conn.close()
    return {"sessions": int(sessions), "transactions": int(xacts)}


def _instance_yaml(db: str) -> str:
    from mc_pipeline.local import local_instance_yaml

    return local_instance_yaml(max_concurrent_runs=MAX_CONCURRENT_RUNS) + (
        "storage:\n  postgres:\n    postgres_db:\n      hostname: 127.0.0.1\n      port: 5432\n"
        f"      username: postgres\n      password: ''\n      db_name: {db}\n      scheme: postgresql+psycopg2\n"
    )


def _requests(stats: dict[str, Any], accounts: set[str] | None = None) -> int:
    return sum(
        v["requests"]
        for k, v in stats.items()
        if k.startswith("mailchimp:") and (accounts is None or k.split(":", 1)[1] in accounts)
    )


SUMMARY = re.compile(
    r"^(?:\x1b\[\d+m)?(\d{4}-\d\d-\d\d \d\d:\d\d):\d\d \+0000.*hourly_incremental_sync - (\d+) lists due: "
    r"(\d+) verified unchanged, (\d+) runs requested.*?; (\d+) Mailchimp calls"
)


def _tick_summaries(log: Path, start: float, end: float) -> list[tuple[datetime, int, int, int, int]]:
    """The schedule's own summary of each tick evaluated in the window (automation/probes.py
    TickReport.summary): (tick's minute, lists due, verified, runs requested, Mailchimp calls)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if m := SUMMARY.match(line):
            minute = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
            if start - 60 <= minute.timestamp() <= end:
                out.append((minute, *(int(g) for g in m.groups()[1:])))
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
    """What a full import of every list leaves, recorded directly (no initial syncs)."""
    from mc_pipeline.assets.watermarks import destination_of, record_import
    from mc_pipeline.partitions import MAILCHIMP_LISTS
    from mc_pipeline.registry import YamlClientRegistry, parse_partition_key

    registry = YamlClientRegistry(sb.registry)
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, keys)
    watermark = datetime.fromisoformat(requests.get(f"{sb.base_url}/_sandbox/clock", timeout=30).json()["now"])
    for key in keys:
        client_id, list_id = parse_partition_key(key)
        record_import(instance, key, watermark, destination_of(registry.client(client_id), list_id))
    return watermark


def run_many_lists(ctx: Context) -> dict[str, Any]:
    import psycopg2  # type: ignore[import-untyped]
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from mc_pipeline.assets.watermarks import latest_events
    from mc_pipeline.automation.probes import Cadence
    from mc_pipeline.local import dagster_daemon, patched_environ
    from mc_pipeline.registry import parse_partition_key
    from mc_pipeline.tags import SYNC_KIND

    p = ctx.plan
    work = ctx.dir("6_many_lists")
    home, procs_dir = work / "dagster_home", work / "procs"
    for old in (home, work / "data", procs_dir):
        shutil.rmtree(old, ignore_errors=True)
    (work / "daemon.log").unlink(missing_ok=True)
    home.mkdir()
    procs_dir.mkdir()
    db = f"mc_pipeline_bench6_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(PG + " dbname=postgres")
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{db}"')
    (home / "dagster.yaml").write_text(_instance_yaml(db))
    clients = {f"acct-{i + 1:03d}": [p.lists_members] * p.lists_per_client for i in range(p.lists_clients)}
    n_lists = p.lists_clients * p.lists_per_client
    cadence = Cadence(every_s=CYCLE_MIN * 60, tick_s=TICK_MIN * 60)
    try:
        with sandbox(sandbox_config(clients), work / "sandbox") as sb:
            env = {**sb.env(work / "data"), "DAGSTER_HOME": str(home)}
            keys = [f"{c}:{lid}" for c in clients for lid in sb.lists(c)]
            changed = keys[:: p.lists_changed_every]
            changed_accounts = {parse_partition_key(k)[0] for k in changed}
            clean_accounts = set(clients) - changed_accounts
            clean_lists = [k for k in keys if parse_partition_key(k)[0] in clean_accounts]
            ctx.log(f"  synced state of {n_lists} lists recorded directly; {len(changed)} lists get a new member")
            t0 = time.monotonic()
            with patched_environ(env), DagsterInstance.from_config(str(home)) as instance:
                watermark = _record_synced_state(instance, sb, keys)
            record_s = time.monotonic() - t0
            time.sleep(2)  # the new members' last_changed after the watermark, on the sandbox's clock
            for i, key in enumerate(changed):
                list_id = parse_partition_key(key)[1]
                requests.post(
                    f"{sb.base_url}/_sandbox/mailchimp/lists/{list_id}/members",
                    json={"email_address": f"bench6-new-{i}@example.com"},
                    timeout=30,
                ).raise_for_status()

            # The daemon starts early in a minute; its first tick is the next minute (the scheduler
            # fires the ticks after it first sees the schedule, ~30 s after the start).
            while datetime.now(UTC).second >= 10:
                time.sleep(0.5)
            first = (datetime.now(UTC) + timedelta(minutes=1)).replace(second=0, microsecond=0)
            ticks = [first + timedelta(minutes=TICK_MIN * i) for i in range(CYCLE_MIN // TICK_MIN)]
            end_of_cycle = ticks[-1] + timedelta(minutes=TICK_MIN)
            daemon_env = {
                **env,
                "MC_PIPELINE_VERIFY_EVERY_MIN": str(CYCLE_MIN),
                "MC_PIPELINE_PROBE_TICK_MIN": str(TICK_MIN),
                "MC_PIPELINE_INCREMENTAL_CRON": "",
                "MC_BENCH_PROC_LOG": str(procs_dir),
                "PYTHONPATH": os.pathsep.join([str(HOOK), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
                    os.pathsep
                ),
            }
            ctx.log(f"  dagster-daemon on PostgreSQL; the compressed hour: ticks {first:%H:%M}..{ticks[-1]:%H:%M} UTC")
            log = work / "daemon.log"
            with (
                patched_environ(env),
                DagsterInstance.from_config(str(home)) as instance,
                dagster_daemon(log, daemon_env) as daemon,
            ):
                while datetime.now(UTC) < first - timedelta(seconds=6):
                    if daemon.poll() is not None:
                        raise RuntimeError(f"dagster-daemon exited; see {log}")
                    time.sleep(0.5)
                cpu0, pg0, pgs0, mc0, start = (
                    _tree_cpu(daemon.pid),
                    _postgres_cpu(),
                    _pg_stats(db),
                    sb.requests_by_label(),
                    time.time(),
                )
                in_window = RunsFilter(created_after=first - timedelta(seconds=5))
                deadline = end_of_cycle + timedelta(minutes=20)
                stopped = False
                while True:
                    now = datetime.now(UTC)
                    if not stopped and any(t == ticks[-1] for t, *_ in _tick_summaries(log, start, now.timestamp())):
                        stopped = _stop_schedule(instance)  # the cycle is over: no sixth tick in the window
                    records = instance.get_run_records(filters=in_window)
                    ended = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
                    if now >= ticks[-1] + timedelta(seconds=30) and all(x.dagster_run.status in ended for x in records):
                        break
                    if now > deadline or daemon.poll() is not None:
                        raise RuntimeError(f"the hour did not finish; see {log}")
                    time.sleep(2.0)
                cpu1, end, daemon_pid = _tree_cpu(daemon.pid), time.time(), daemon.pid
                server_pids = [c.pid for c in psutil.Process(daemon_pid).children() if "grpc" in c.cmdline()]
                pg1, mc1 = _postgres_cpu(), sb.requests_by_label()
                pgs1 = _pg_stats(db)
                events = latest_events(instance, set(keys))
        entries = [json.loads(f.read_text()) for f in procs_dir.glob("*.json")]
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()

    # CPU of the daemon's tree over the window: live processes from their CPU at the start, the
    # exited ones from their own exit record (a process both started and ended in the window whole).
    cpu = {pid: c - cpu0.get(pid, 0.0) for pid, c in cpu1.items()}
    for e in entries:
        if e["pid"] not in cpu1 and start <= e["ended"] and e["started"] <= end:
            cpu[e["pid"]] = e["cpu_s"] - cpu0.get(e["pid"], 0.0)
    runs = [x for x in records if x.dagster_run.tags.get(SYNC_KIND) == "incremental"]
    # A run process is spawned by multiprocessing from a code server (the daemon's children with
    # "grpc" in their argv), which gives it its parent's argv.
    servers = {e["pid"] for e in entries if e["ppid"] == daemon_pid and "grpc" in e["argv"]} | set(server_pids)
    run_pids = {e["pid"] for e in entries if e["pid"] in cpu and e["ppid"] in servers and "grpc" in e["argv"]}
    run_cpu = sum(cpu[pid] for pid in run_pids)
    daemon_cpu = sum(cpu.values())
    pg_cpu = pg1 - pg0
    total = daemon_cpu + pg_cpu
    wall = end - start
    cores = psutil.cpu_count() or 1
    runs_failed = sum(1 for x in runs if x.dagster_run.status != DagsterRunStatus.SUCCESS)

    # Per list: synced (a run's import) or verified (an observation), and how long after its tick.
    tick_of = {k: t for t in ticks for k in keys if cadence.slot_in_tick(k, t) is not None}
    imported = {k for k, (imp, _) in events.items() if imp.timestamp > start - 5}
    verified = {k for k, (_, v) in events.items() if v is not None and k not in imported}
    done_at = {
        k: (imp.timestamp if k in imported else v.timestamp) for k, (imp, v) in events.items() if v or k in imported
    }
    missing = [k for k in keys if k not in done_at]
    lag = max((done_at[k] - tick_of[k].timestamp() for k in done_at if k in tick_of), default=0.0)
    # What the window probed, from the schedule's summaries (the schedule is stopped after the fifth).
    summaries = _tick_summaries(log, start, end)
    window_ticks = sorted({t for t, *_ in summaries})
    unchanged = sum(v for _, _, v, _, _ in summaries)
    clean_probes = sum(1 for t in window_ticks for k in clean_lists if cadence.slot_in_tick(k, t) is not None)
    sessions = pgs1["sessions"] - pgs0["sessions"]  # _pg_stats connects to another database
    # One list-hour: each list's probe (and its run if it changed) once; the fixed costs here are 5 minutes'.
    cpu_unchanged = (total - run_cpu) / max(unchanged, 1)
    cpu_per_list_hour = total / max(unchanged + len(runs), 1)
    details = {
        "lists": n_lists,
        "accounts": p.lists_clients,
        "changed": len(changed),
        "record_synced_state_s": r(record_s, 1),
        "watermark": watermark.isoformat(),
        "window_s": r(wall, 1),
        "cpu_s": {
            "daemon_code_servers_and_runs": r(daemon_cpu, 1),
            "run_processes": r(run_cpu, 1),
            "run_processes_recorded": len(run_pids),
            "postgres": r(pg_cpu, 1),
            "total": r(total, 1),
        },
        "processes_seen": len(cpu),
        "runs_incremental": len(runs),
        "runs_failed": runs_failed,
        "runs_other": len(records) - len(runs),
        "lists_imported": len(imported),
        "imported_not_changed": sorted(imported - set(changed))[:10],
        "changed_not_imported": sorted(set(changed) - imported)[:10],
        "lists_verified": len(verified),
        "lists_neither": missing[:10],
        "largest_lag_after_tick_s": r(lag, 1),
        "pg_sessions": sessions,
        "pg_transactions": pgs1["transactions"] - pgs0["transactions"],
        "mailchimp_calls": _requests(mc1) - _requests(mc0),
        "mailchimp_calls_unchanged_accounts": _requests(mc1, clean_accounts) - _requests(mc0, clean_accounts),
        "unchanged_accounts_lists": len(clean_lists),
        "unchanged_accounts_probes": clean_probes,
        "ticks": [
            {"tick": f"{t:%H:%M}", "due": d, "verified": v, "runs_requested": q, "mailchimp_calls": c}
            for t, d, v, q, c in summaries
        ],
        "verifications": unchanged,
        "schedule_stopped_after_the_cycle": stopped,
    }
    calls_unchanged = details["mailchimp_calls_unchanged_accounts"] / max(clean_probes, 1)
    busy = total / max(wall * cores, 1e-9)
    return {
        "title": "6. Many lists: one hour of the change-aware schedule, 5% changed (daemon, PostgreSQL)",
        "settings": {
            "lists": f"{p.lists_clients} accounts x {p.lists_per_client} lists x {p.lists_members} members; "
            f"every {p.lists_changed_every}th list gets a new member",
            "start": "synced state recorded directly (watermarks.record_import per list, on the sandbox's clock)",
            "hour": f"compressed {COMPRESSION}x: MC_PIPELINE_VERIFY_EVERY_MIN={CYCLE_MIN}, "
            f"MC_PIPELINE_PROBE_TICK_MIN={TICK_MIN} (each list probed once in {CYCLE_MIN} min)",
            "instance": f"PostgreSQL 15, QueuedRunCoordinator (max {MAX_CONCURRENT_RUNS} runs, 1 per account)",
            "cpu": "daemon + code servers + run workers (psutil + exit records) + every postgres process",
        },
        "figures": [
            figure(
                "6a",
                "CPU s per unchanged list-hour (all processes, PostgreSQL incl.)",
                r(cpu_unchanged, 4),
                "<=",
                0.02,
                "s",
            ),
            figure(
                "6b",
                "PostgreSQL sessions opened per list-hour",
                r(sessions / max(unchanged + len(runs), 1), 2),
                "",
                None,
            ),
            figure("6c", f"runs launched ({len(changed)} lists changed)", len(runs), "<=", len(changed)),
            figure("6d", "Mailchimp calls per unchanged list", r(calls_unchanged, 2), "<=", 2),
            figure(
                "6e",
                "largest staleness (cycle + lag after the list's tick)",
                r(60 + lag / 60, 1),
                "<=",
                60,
                "min",
                note="60 min by construction; the lag is measured",
            ),
            figure(
                "6f",
                f"busy share of {cores} cores over the window (work {COMPRESSION}x denser than the hour)",
                r(100 * busy, 1),
                "<=",
                25,
                "%",
            ),
            figure(
                "6g",
                f"busy share of {cores} cores, the same work spread over the real hour",
                r(100 * total / (3600 * cores), 2),
                "<=",
                25,
                "%",
            ),
            figure(
                "6h",
                f"lists one {cores}-core machine keeps hourly (by CPU per list-hour, 5% changed)",
                int(cores * 3600 / max(cpu_per_list_hour, 1e-9)),
                ">=",
                100_000,
            ),
            figure("6i", "lists neither imported nor verified in the hour", len(missing), "==", 0),
        ],
        "details": details,
    }
