"""Scenario 6: hundreds of unchanged lists through the hourly schedule, on a real dagster-daemon.

The lists are synced once first (full syncs in-process, cheap: tiny lists), then the daemon of a
local SQLite instance with the production run queue (`local_instance_yaml`) fires
`hourly_incremental_sync` once, and every run it queues is launched as its own process. What one
tick costs is measured without sampling gaps:

- run processes: each records its own rusage when it exits (benchmarks/_hook/sitecustomize.py,
  on the daemon's PYTHONPATH), so a 3-second process is counted whole;
- the daemon and its code servers: psutil CPU before and after, or their exit records;
- the sandbox counts the Mailchimp and Ometria requests.

The schedule's cron is set to fire once, at the next whole minute (`M H * * *`), rather than
`* * * * *`: a later tick would queue the lists again while the first tick's runs still drain,
and mix two ticks in one measurement.

A second tick runs with the queue's `dequeue_use_threads: true` (a setting of dagster.yaml): by
default the daemon launches queued runs one after the other, and each launch waits until the new
run process has imported Dagster and the code, which bounds how many runs start per minute.

Then the split: the CPU of a new process importing Dagster and the code location, and of the
same incremental run executed in-process (no process, no launch), with and without the archived
sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from benchmarks.harness import REPO, Sandbox, run_worker, sandbox, sandbox_config, start_worker
from benchmarks.scenarios import Context, figure, r

HOOK = Path(__file__).resolve().parent / "_hook"
SEED_WORKERS = 4
MAX_CONCURRENT_RUNS = 8  # as the production dagster.yaml
DEQUEUE_WORKERS = 4


def _tree_cpu(root: int) -> dict[int, tuple[float, bool]]:
    """CPU seconds of a process and its descendants by pid, and whether each is a code server."""
    out = {}
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return out
    for proc in procs:
        try:
            t = proc.cpu_times()
            out[proc.pid] = (t.user + t.system, "grpc" in proc.cmdline())
        except psutil.Error:
            pass
    return out


def _window_cpu(
    before: dict[int, tuple[float, bool]],
    after: dict[int, tuple[float, bool]],
    entries: list[dict],
    start: float,
    end: float,
    daemon: int,
) -> tuple[dict[int, float], float, int]:
    """(CPU of each run process by pid, CPU of everything else, code servers seen) over the tick.

    A process alive at the end counts from its CPU at the start (0 if it started later); one that
    exited meanwhile counts from its own exit record. Run processes are the children of a code
    server (the launcher spawns each run from it); the daemon replaces its code server every
    minute (it reloads the workspace), so the old and the new ones are all in "everything else".
    """
    by_pid = {e["pid"]: e for e in entries}
    cpu: dict[int, float] = {pid: end_cpu - before.get(pid, (0.0, False))[0] for pid, (end_cpu, _) in after.items()}
    for pid, e in by_pid.items():
        if pid not in after and start <= e["ended"] and e["started"] <= end:
            cpu[pid] = e["cpu_s"] - before.get(pid, (0.0, False))[0]
    # A run process is spawned by multiprocessing, which gives it its parent's argv; the code
    # servers are the daemon's children with "grpc" in theirs (the resource trackers have none).
    servers = {pid for pid, (_, grpc) in {**before, **after}.items() if grpc}
    servers |= {pid for pid, e in by_pid.items() if "grpc" in e["argv"] and e["ppid"] == daemon}
    runs = {
        pid
        for pid, e in by_pid.items()
        if e["ppid"] in servers and "grpc" in e["argv"] and e["started"] >= start - 1 and pid in cpu
    }
    return {pid: cpu[pid] for pid in runs}, sum(v for pid, v in cpu.items() if pid not in runs), len(servers)


def _requests(stats: dict[str, Any], prefix: str) -> int:
    return sum(v["requests"] for k, v in stats.items() if k.startswith(prefix))


def _instance_yaml(threaded: bool) -> str:
    from mc_pipeline.local import local_instance_yaml

    text = local_instance_yaml(max_concurrent_runs=MAX_CONCURRENT_RUNS)
    if threaded:
        text = text.replace(
            "    dequeue_interval_seconds: 1\n",
            f"    dequeue_interval_seconds: 1\n    dequeue_use_threads: true\n"
            f"    dequeue_num_workers: {DEQUEUE_WORKERS}\n",
        )
    return text


def _tick(ctx: Context, sb: Sandbox, env: dict[str, str], work: Path, n_lists: int, label: str) -> dict[str, Any]:
    """One firing of hourly_incremental_sync on a fresh dagster-daemon, until every run it queued ended."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from mc_pipeline.local import dagster_daemon
    from mc_pipeline.tags import SYNC_KIND

    home = Path(env["DAGSTER_HOME"])
    (home / "dagster.yaml").write_text(_instance_yaml(threaded=label == "threaded"))
    instance = DagsterInstance.from_config(str(home))
    procs_dir = work / f"procs-{label}"
    shutil.rmtree(procs_dir, ignore_errors=True)
    procs_dir.mkdir()
    fire = (datetime.now(UTC) + timedelta(seconds=45)).replace(second=0, microsecond=0) + timedelta(minutes=1)
    daemon_env = {
        **env,
        "MC_PIPELINE_INCREMENTAL_CRON": f"{fire.minute} {fire.hour} * * *",
        "MC_BENCH_PROC_LOG": str(procs_dir),
        "PYTHONPATH": os.pathsep.join([str(HOOK), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    ctx.log(f"  dagster-daemon ({label} launches); hourly_incremental_sync fires once at {fire:%H:%M} UTC")
    this_tick = RunsFilter(tags={SYNC_KIND: "incremental"}, created_after=fire - timedelta(seconds=30))
    with dagster_daemon(work / f"daemon-{label}.log", daemon_env) as daemon:
        while datetime.now(UTC) < fire - timedelta(seconds=3):
            if daemon.poll() is not None:
                raise RuntimeError(f"dagster-daemon exited; see {work / f'daemon-{label}.log'}")
            time.sleep(0.5)
        before_cpu, before_stats, start = _tree_cpu(daemon.pid), sb.requests_by_label(), time.time()
        deadline, last_note = time.monotonic() + 3600, time.monotonic()
        while True:
            records = instance.get_run_records(filters=this_tick)
            ended = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
            done = [x for x in records if x.dagster_run.status in ended]
            if len(records) >= n_lists and len(done) == len(records):
                break
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError(f"tick not finished ({len(done)}/{n_lists}); see {work / f'daemon-{label}.log'}")
            if time.monotonic() - last_note > 120:
                last_note = time.monotonic()
                ctx.log(f"    {len(done)}/{n_lists} runs finished")
            time.sleep(1.0)
        after_cpu, end, after_stats = _tree_cpu(daemon.pid), time.time(), sb.requests_by_label()
        others = instance.get_run_records(filters=RunsFilter(created_after=datetime.fromtimestamp(start - 30, UTC)))
    entries = [json.loads(path.read_text()) for path in procs_dir.glob("*.json")]
    runs_cpu, long_lived, code_servers = _window_cpu(before_cpu, after_cpu, entries, start, end, daemon.pid)
    run_cpu = list(runs_cpu.values())
    run_rss = [e["maxrss_mib"] for e in entries if e["pid"] in runs_cpu]
    launched = max(len(run_cpu), len(done))  # all run processes, a freshness-check run included
    tick_wall = max(x.end_time for x in done if x.end_time) - fire.timestamp()
    total = sum(run_cpu) + long_lived
    cores = psutil.cpu_count() or 1
    return {
        "runs": len(done),
        "runs_failed": sum(1 for x in done if x.dagster_run.status != DagsterRunStatus.SUCCESS),
        "other_runs": max(0, len(others) - len(done)),
        "run_processes_recorded": len(run_cpu),
        "code_servers_seen": code_servers,
        "tick_wall_s": r(tick_wall, 1),
        "first_run_started_after_tick_s": r(min(x.start_time for x in done if x.start_time) - fire.timestamp(), 1),
        "cpu_s_total": r(total, 1),
        "cpu_s_run_processes": r(sum(run_cpu), 1),
        "cpu_s_daemon_and_code_servers": r(long_lived, 1),
        "cpu_s_per_run": r(total / max(launched, 1)),
        "run_process_cpu_s_median": r(statistics.median(run_cpu)) if run_cpu else None,
        "run_process_peak_rss_mib_median": r(statistics.median(run_rss), 0) if run_rss else None,
        "machine_busy_cores": r(total / max(end - start, 1e-9), 2),
        "mailchimp_calls_per_list": r(
            (_requests(after_stats, "mailchimp:") - _requests(before_stats, "mailchimp:")) / n_lists, 2
        ),
        "ometria_calls": _requests(after_stats, "ometria:") - _requests(before_stats, "ometria:"),
        "lists_per_hour_measured": int(len(done) / tick_wall * 3600),
        "lists_per_hour_cpu_bound": int(cores * 3600 * max(launched, 1) / max(total, 1e-9)),
    }


def run_many_lists(ctx: Context) -> dict[str, Any]:
    from dagster import DagsterInstance

    from mc_pipeline.partitions import MAILCHIMP_LISTS

    p = ctx.plan
    work = ctx.dir("6_many_lists")
    home = work / "dagster_home"
    for old in (home, work / "data"):
        shutil.rmtree(old, ignore_errors=True)
    home.mkdir()
    (home / "dagster.yaml").write_text(_instance_yaml(threaded=False))
    clients = {f"lists-{i + 1:02d}": [p.lists_members] * p.lists_per_client for i in range(p.lists_clients)}
    n_lists = p.lists_clients * p.lists_per_client
    with sandbox(sandbox_config(clients), work / "sandbox") as sb:
        env = {**sb.env(work / "data"), "DAGSTER_HOME": str(home)}
        partitions = [f"{c}:{lid}" for c in clients for lid in sb.lists(c)]
        # The instance's storage and the partitions are created here, once: SQLite schema creation
        # from several processes at once races.
        DagsterInstance.from_config(str(home)).add_dynamic_partitions(MAILCHIMP_LISTS, partitions)

        # 1. Every list synced once (not measured): full syncs in-process, a few processes at once.
        ctx.log(f"  first syncs of {n_lists} lists of {p.lists_members} members (in-process, not measured)")
        t0 = time.monotonic()
        seeders = [
            start_worker(
                "sync",
                {"partitions": partitions[i::SEED_WORKERS], "full_refresh": True, "detail": False},
                work / "seed",
                env=env,
                name=f"seed-{i}",
                timeout_s=3600,
            )
            for i in range(min(SEED_WORKERS, n_lists))
        ]
        seeded = [run for w in seeders for run in w.finish().output["runs"]]
        failed = [run["partition"] for run in seeded if not run["success"]]
        if failed:
            raise RuntimeError(f"first syncs failed: {failed[:5]}")
        seed_s = time.monotonic() - t0

        # 2. One tick of the hourly schedule through the daemon, the run queue and the launcher;
        # then another with the queue launching runs from a few threads.
        ticks = {label: _tick(ctx, sb, env, work, n_lists, label) for label in ("default", "threaded")}

        # 3. The split: a new process's imports, and the run's own work in-process.
        ctx.log("  split: process start + imports, and the same runs in-process")
        imports = [run_worker("imports", {}, work / "split", env=env, name=f"imports-{i}").cpu_s for i in range(3)]
        m = min(p.lists_inprocess, n_lists // 2)
        inprocess = {}
        for label, subset, extra in (
            ("sweep_archived=True", partitions[:m], {}),
            ("sweep_archived=False", partitions[m : 2 * m], {"mailchimp": {"sweep_archived": False}}),
        ):
            s0 = sb.requests_by_label()
            out = run_worker(
                "sync",
                {"partitions": subset, "detail": False, **extra},
                work / "split",
                env=env,
                name=f"inproc-{label}",
            ).output
            s1 = sb.requests_by_label()
            steady = out["runs"][1:] or out["runs"]  # the first run also pays lazy set-up
            inprocess[label] = {
                "runs": len(out["runs"]),
                "success": all(x["success"] for x in out["runs"]),
                "cpu_s_per_run": r(statistics.median(x["cpu_s"] for x in steady)),
                "wall_s_per_run": r(statistics.median(x["wall_s"] for x in steady)),
                "mailchimp_calls_per_list": r(
                    (_requests(s1, "mailchimp:") - _requests(s0, "mailchimp:")) / len(subset), 2
                ),
                "ometria_calls": _requests(s1, "ometria:") - _requests(s0, "ometria:"),
            }
    tick = ticks["default"]
    imports_cpu = statistics.median(imports)
    own = inprocess["sweep_archived=True"]["cpu_s_per_run"]
    cores = psutil.cpu_count() or 1
    details = {
        "lists": n_lists,
        "first_syncs_s": r(seed_s, 1),
        "ticks": ticks,
        "split_per_run": {
            "process_start_and_imports_cpu_s": r(imports_cpu),
            "run_in_process_cpu_s": own,
            "launch_and_run_setup_cpu_s": r(tick["cpu_s_per_run"] - imports_cpu - own),
        },
        "in_process": inprocess,
        "lists_per_hour_if_runs_were_in_process": int(cores * 3600 / own),
    }
    return {
        "title": "6. Many lists (one tick of the hourly schedule on a dagster-daemon)",
        "settings": {
            "lists": f"{p.lists_clients} clients x {p.lists_per_client} lists x {p.lists_members} members, unchanged",
            "instance": f"SQLite, QueuedRunCoordinator (max {MAX_CONCURRENT_RUNS} runs, 1 per account)",
            "cron": "fires once at the next whole minute",
            "second tick": f"dequeue_use_threads: true, dequeue_num_workers: {DEQUEUE_WORKERS}",
        },
        "figures": [
            figure(
                "6a", "CPU seconds per partition run (daemon + run processes)", tick["cpu_s_per_run"], "<=", 2.0, "s"
            ),
            figure(
                "6b",
                "Mailchimp calls per unchanged list (archived sweep on)",
                tick["mailchimp_calls_per_list"],
                "==",
                2.0,
            ),
            figure(
                "6c",
                "Mailchimp calls per unchanged list, sweep_archived=False (in-process)",
                inprocess["sweep_archived=False"]["mailchimp_calls_per_list"],
                "==",
                1.0,
            ),
            figure("6d", "Ometria calls for unchanged lists", tick["ometria_calls"], "==", 0),
            figure(
                "6e",
                f"lists one {cores}-core machine keeps synced hourly, by CPU (a run per list)",
                tick["lists_per_hour_cpu_bound"],
                "",
                None,
            ),
            figure(
                "6f",
                "lists per hour through one daemon, measured (runs launched one at a time)",
                tick["lists_per_hour_measured"],
                "",
                None,
            ),
            figure(
                "6g",
                f"lists per hour through one daemon, measured (dequeue_use_threads, {DEQUEUE_WORKERS} workers)",
                ticks["threaded"]["lists_per_hour_measured"],
                "",
                None,
            ),
        ],
        "details": details,
    }
