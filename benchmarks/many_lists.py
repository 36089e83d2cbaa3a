"""Scenario 6: hundreds of unchanged lists through the hourly schedule, on a real dagster-daemon.

The lists are synced once first (full syncs in-process, cheap: tiny lists), then the daemon of a
local SQLite instance with the production run queue (`local_instance_yaml`) fires
`hourly_incremental_sync` once, and every run it queues is launched as its own process. What one
tick costs is measured without sampling gaps:

- run processes: each records its own rusage when it exits (benchmarks/_hook/sitecustomize.py,
  on the daemon's PYTHONPATH), so a 3-second process is counted whole;
- the daemon and its code server live through the tick: psutil CPU before and after;
- the sandbox counts the Mailchimp and Ometria requests.

The schedule's cron is set to fire once, at the next whole minute (`M H * * *`), rather than
`* * * * *`: a later tick would queue the lists again while the first tick's runs still drain,
and mix two ticks in one measurement.

Then the split: the CPU of a new process importing Dagster and the code location, and the CPU
of the same incremental run executed in-process (no process, no launch), with and without the
archived sweep.
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

from benchmarks.harness import REPO, run_worker, sandbox, sandbox_config, start_worker
from benchmarks.scenarios import Context, figure, r

HOOK = Path(__file__).resolve().parent / "_hook"
SEED_WORKERS = 4
MAX_CONCURRENT_RUNS = 8  # as the production dagster.yaml


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
) -> tuple[dict[int, float], float, int]:
    """(CPU of each run process by pid, CPU of everything else, code servers seen) over the tick.

    A process alive at the end counts from its CPU at the start (0 if it started later); one that
    exited meanwhile counts from its own exit record. Run processes are the children of a code
    server (the launcher spawns each run from it); the daemon may replace its code server while
    the tick drains, so the old and the new one are both in "everything else".
    """
    by_pid = {e["pid"]: e for e in entries}
    cpu: dict[int, float] = {pid: end - before.get(pid, (0.0, False))[0] for pid, (end, _) in after.items()}
    for pid, e in by_pid.items():
        if pid not in after and start <= e["ended"] and e["started"] <= end:
            cpu[pid] = e["cpu_s"] - before.get(pid, (0.0, False))[0]
    servers = {pid for pid, (_, grpc) in {**before, **after}.items() if grpc}
    servers |= {pid for pid, e in by_pid.items() if "grpc" in e["argv"] and e["ppid"] not in servers}
    runs = {pid for pid, e in by_pid.items() if e["ppid"] in servers and e["started"] >= start - 1 and pid in cpu}
    return {pid: cpu[pid] for pid in runs}, sum(v for pid, v in cpu.items() if pid not in runs), len(servers)


def _requests(stats: dict[str, Any], prefix: str) -> int:
    return sum(v["requests"] for k, v in stats.items() if k.startswith(prefix))


def run_many_lists(ctx: Context) -> dict[str, Any]:
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from mc_pipeline.local import dagster_daemon, local_instance_yaml
    from mc_pipeline.tags import SYNC_KIND

    p = ctx.plan
    work = ctx.dir("6_many_lists")
    home = work / "dagster_home"
    for old in (home, work / "data", work / "procs"):
        shutil.rmtree(old, ignore_errors=True)
    home.mkdir()
    (home / "dagster.yaml").write_text(local_instance_yaml(max_concurrent_runs=MAX_CONCURRENT_RUNS))
    clients = {f"lists-{i + 1:02d}": [p.lists_members] * p.lists_per_client for i in range(p.lists_clients)}
    n_lists = p.lists_clients * p.lists_per_client
    with sandbox(sandbox_config(clients), work / "sandbox") as sb:
        env = {**sb.env(work / "data"), "DAGSTER_HOME": str(home)}
        partitions = [f"{c}:{lid}" for c in clients for lid in sb.lists(c)]

        # The instance's storage and the partitions are created here, once: SQLite schema creation
        # from several processes at once races.
        from mc_pipeline.partitions import MAILCHIMP_LISTS

        instance = DagsterInstance.from_config(str(home))
        instance.add_dynamic_partitions(MAILCHIMP_LISTS, partitions)

        # 1. Every list synced once (not measured): full syncs in-process, a few processes at once.
        ctx.log(f"  first syncs of {n_lists} lists of {p.lists_members} members (in-process, not measured)")
        t0 = time.monotonic()
        chunks = [partitions[i::SEED_WORKERS] for i in range(SEED_WORKERS)]
        seeders = [
            start_worker(
                "sync",
                {"partitions": chunk, "full_refresh": True, "detail": False},
                work / "seed",
                env=env,
                name=f"seed-{i}",
                timeout_s=3600,
            )
            for i, chunk in enumerate(chunks)
            if chunk
        ]
        seeded = [run for w in seeders for run in w.finish().output["runs"]]
        failed = [run["partition"] for run in seeded if not run["success"]]
        if failed:
            raise RuntimeError(f"first syncs failed: {failed[:5]}")
        seed_s = time.monotonic() - t0

        # 2. One tick of the hourly schedule through the daemon, the run queue and the launcher.
        procs_dir = work / "procs"
        procs_dir.mkdir()
        fire = (datetime.now(UTC) + timedelta(seconds=75)).replace(second=0, microsecond=0) + timedelta(minutes=1)
        daemon_env = {
            **env,
            "MC_PIPELINE_INCREMENTAL_CRON": f"{fire.minute} {fire.hour} * * *",
            "MC_BENCH_PROC_LOG": str(procs_dir),
            "PYTHONPATH": os.pathsep.join([str(HOOK), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        ctx.log(f"  dagster-daemon started; hourly_incremental_sync fires once at {fire:%H:%M} UTC")
        with dagster_daemon(work / "daemon.log", daemon_env) as daemon:
            while datetime.now(UTC) < fire - timedelta(seconds=3):
                if daemon.poll() is not None:
                    raise RuntimeError(f"dagster-daemon exited; see {work / 'daemon.log'}")
                time.sleep(0.5)
            before_cpu = _tree_cpu(daemon.pid)
            before_stats = sb.requests_by_label()
            window_start = time.time()
            deadline = time.monotonic() + 3600
            done: list[Any] = []
            last_note = time.monotonic()
            while True:
                records = instance.get_run_records(filters=RunsFilter(tags={SYNC_KIND: "incremental"}))
                done = [
                    x for x in records if x.dagster_run.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE)
                ]
                if len(records) >= n_lists and len(done) == len(records):
                    break
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError(f"tick not finished ({len(done)}/{n_lists}); see {work / 'daemon.log'}")
                if time.monotonic() - last_note > 60:
                    last_note = time.monotonic()
                    ctx.log(f"    {len(done)}/{n_lists} runs finished")
                time.sleep(1.0)
            after_cpu, window_end = _tree_cpu(daemon.pid), time.time()
            after_stats = sb.requests_by_label()
            all_runs = instance.get_run_records(
                filters=RunsFilter(created_after=datetime.fromtimestamp(window_start - 5, UTC))
            )
        failures = [x.dagster_run.run_id for x in done if x.dagster_run.status != DagsterRunStatus.SUCCESS]
        entries = [json.loads(path.read_text()) for path in procs_dir.glob("*.json")]
        runs_cpu, long_lived, code_servers = _window_cpu(before_cpu, after_cpu, entries, window_start, window_end)
        run_cpu = list(runs_cpu.values())
        run_rss = [e["maxrss_mib"] for e in entries if e["pid"] in runs_cpu]
        first_start = min(x.start_time for x in done if x.start_time)
        last_end = max(x.end_time for x in done if x.end_time)
        tick_wall = last_end - fire.timestamp()
        mc_calls = _requests(after_stats, "mailchimp:") - _requests(before_stats, "mailchimp:")
        om_calls = _requests(after_stats, "ometria:") - _requests(before_stats, "ometria:")
        total_cpu = sum(run_cpu) + long_lived
        cpu_per_run = total_cpu / max(len(done), 1)

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
    imports_cpu = statistics.median(imports)
    own = inprocess["sweep_archived=True"]["cpu_s_per_run"]
    cores = psutil.cpu_count() or 1
    details = {
        "lists": n_lists,
        "runs_finished": len(done),
        "runs_failed": len(failures),
        "other_runs_in_window": max(0, len(all_runs) - len(done)),
        "run_processes_recorded": len(run_cpu),
        "code_servers_seen": code_servers,
        "first_syncs_s": r(seed_s, 1),
        "tick_wall_s": r(tick_wall, 1),
        "first_run_started_after_tick_s": r(first_start - fire.timestamp(), 1),
        "cpu_s_total": r(total_cpu, 1),
        "cpu_s_run_processes": r(sum(run_cpu), 1),
        "cpu_s_daemon_and_code_server": r(long_lived, 1),
        "cpu_s_per_run": r(cpu_per_run),
        "run_process_cpu_s_median": r(statistics.median(run_cpu)) if run_cpu else None,
        "run_process_peak_rss_mib_median": r(statistics.median(run_rss), 0) if run_rss else None,
        "split_per_run": {
            "process_start_and_imports_cpu_s": r(imports_cpu),
            "run_in_process_cpu_s": own,
            "launch_and_run_setup_cpu_s": r(cpu_per_run - imports_cpu - own),
        },
        "in_process": inprocess,
        "mailchimp_calls_per_list": r(mc_calls / n_lists, 2),
        "ometria_calls": om_calls,
        "lists_per_hour_one_machine_cpu_bound": int(cores * 3600 / cpu_per_run),
        "lists_per_hour_measured_rate": int(len(done) / tick_wall * 3600),
        "max_concurrent_runs": MAX_CONCURRENT_RUNS,
    }
    return {
        "title": "6. Many lists (one tick of the hourly schedule on a dagster-daemon)",
        "settings": {
            "lists": f"{p.lists_clients} clients x {p.lists_per_client} lists x {p.lists_members} members, unchanged",
            "instance": f"SQLite, QueuedRunCoordinator (max {MAX_CONCURRENT_RUNS} runs, 1 per account)",
            "cron": "fires once at the next whole minute",
        },
        "figures": [
            figure("6a", "CPU seconds per partition run (daemon + run processes)", r(cpu_per_run), "<=", 2.0, "s"),
            figure("6b", "Mailchimp calls per unchanged list (archived sweep on)", r(mc_calls / n_lists, 2), "==", 2.0),
            figure(
                "6c",
                "Mailchimp calls per unchanged list, sweep_archived=False (in-process)",
                inprocess["sweep_archived=False"]["mailchimp_calls_per_list"],
                "==",
                1.0,
            ),
            figure("6d", "Ometria calls for unchanged lists", om_calls, "==", 0),
            figure(
                "6e",
                f"lists one {cores}-core machine keeps synced hourly (CPU-bound projection)",
                details["lists_per_hour_one_machine_cpu_bound"],
                "",
                None,
            ),
        ],
        "details": details,
    }
