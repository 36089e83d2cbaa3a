"""Scenario 6's figures from what benchmarks/many_lists.py measured (its raw.json), every part given.

The window's CPU (the daemon's tree, the PostgreSQL cluster) is split four ways:

- fixed: what the daemon, its code servers and PostgreSQL spend with no list due, the idle
  baseline's rate times the window (and the freshness check's runs, 4 an hour);
- probes: the ticks' own CPU (their threads, TickReport.cpu_s) and the code server's sessions'
  backend CPU above the idle rate;
- runs: the run processes, their sessions' backend CPU, and what the daemon and code servers
  spent above idle besides the ticks (queueing, launching and watching runs, the daemon's side of
  each tick: charged to the runs, an upper bound for them);
- the benchmark's own sessions (polling the runs), left out.

PostgreSQL's CPU not in any session's backend (the postmaster forking a backend per session,
backends exiting, the WAL writer) above its idle rate is shared out by sessions opened.
Per list-hour figures are for the hourly promise (a probe cycle of 50 minutes: 1.2 probes a list
an hour) with 5% of the lists changed in the hour.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from benchmarks.scenarios import figure, r

ROLES = ("daemon", "code-server", "run-sync", "run-other", "harness", "other")


def _cpu_between(a: dict[str, Any], b: dict[str, Any], processes: list[dict[str, Any]]) -> dict[int, tuple[float, str]]:
    """CPU of each process of the daemon's tree between two snapshots, and its role."""
    before = {int(pid): v[0] for pid, v in a["tree"].items()}
    out = {int(pid): (cpu - before.get(int(pid), 0.0), role) for pid, (cpu, role) in b["tree"].items()}
    for e in processes:
        if e["pid"] not in out and a["t"] < e["ended"] <= b["t"]:
            out[e["pid"]] = (e["cpu_s"] - before.get(e["pid"], 0.0), e.get("role", "other"))
    return out


def _sessions_between(raw: dict[str, Any], a: float, b: float, sync_pids: set[int]) -> dict[str, list[float]]:
    """Per role: [sessions closed, their backends' CPU s] in (a, b]."""
    out = {role: [0.0, 0.0] for role in ROLES}
    for key, rows in raw["sessions"].items():
        role, pid = key.rsplit("-", 1)
        if role == "run":
            role = "run-sync" if int(pid) in sync_pids else "run-other"
        role = role if role in out else "other"
        for t, ns in rows:
            if a < t <= b:
                out[role][0] += 1
                out[role][1] += ns / 1e9
    return out


def split(raw: dict[str, Any]) -> dict[str, Any]:
    """The window's CPU and sessions, part by part, and the idle rates."""
    s0, s1, s2 = raw["snapshots"]
    window, base = s1["t"] - s0["t"], s2["t"] - s1["t"]
    sync_pids = {int(x["pid"]) for x in raw["runs"] if x["kind"] == "incremental" and x["pid"]}
    cpu_w, cpu_b = _cpu_between(s0, s1, raw["processes"]), _cpu_between(s1, s2, raw["processes"])
    proc = {
        "run-sync": sum(c for pid, (c, role) in cpu_w.items() if role == "run" and pid in sync_pids),
        "run-other": sum(c for pid, (c, role) in cpu_w.items() if role == "run" and pid not in sync_pids),
        "servers": sum(c for c, role in cpu_w.values() if role != "run"),
    }
    idle_servers = sum(c for c, role in cpu_b.values() if role != "run") / base
    sw, sb = _sessions_between(raw, s0["t"], s1["t"], sync_pids), _sessions_between(raw, s1["t"], s2["t"], sync_pids)
    pg_w = s1["pg_cpu_s"] - s0["pg_cpu_s"] - (s1["admin_cpu_s"] - s0["admin_cpu_s"])
    pg_b = s2["pg_cpu_s"] - s1["pg_cpu_s"] - (s2["admin_cpu_s"] - s1["admin_cpu_s"])
    residual_w = pg_w - sum(v[1] for v in sw.values())
    residual_rate = (pg_b - sum(v[1] for v in sb.values())) / base
    idle_pg = {
        role: [n / base, c / base] for role, (n, c) in sb.items() if role not in ("harness", "run-sync", "run-other")
    }
    window_ticks = {datetime.fromisoformat(t).strftime("%Y-%m-%d %H:%M") for t in raw["ticks"]}
    ticks = [t for t in raw["summaries"] if t["tick"] in window_ticks]
    tick_cpu = sum(t["cpu_s"] for t in ticks)

    def above(role: str, i: int) -> float:
        return max(0.0, sw[role][i] - idle_pg.get(role, [0.0, 0.0])[i] * window)

    sessions = {
        "probes": above("code-server", 0),
        "runs": sw["run-sync"][0] + above("daemon", 0),
        "other_runs": sw["run-other"][0],
        "harness": sw["harness"][0],
    }
    extra = max(0.0, residual_w - residual_rate * window)
    share = {k: extra * n / max(sum(sessions.values()), 1.0) for k, n in sessions.items()}
    parts = {
        "fixed": (idle_servers + sum(c for _, c in idle_pg.values()) + residual_rate) * window,
        "probes": tick_cpu + above("code-server", 1) + share["probes"],
        "runs": proc["run-sync"]
        + sw["run-sync"][1]
        + max(0.0, proc["servers"] - idle_servers * window - tick_cpu)
        + above("daemon", 1)
        + share["runs"],
        "other_runs": proc["run-other"] + sw["run-other"][1] + share["other_runs"],
        "harness": sw["harness"][1] + share["harness"],
    }
    total = proc["servers"] + proc["run-sync"] + proc["run-other"] + pg_w
    return {
        "window_s": window,
        "baseline_s": base,
        "ticks": ticks,
        "cpu_s": {
            "total": total,
            "processes": proc,
            "ticks_own": tick_cpu,
            "postgres": pg_w,
            "postgres_sessions_by_role": {k: v[1] for k, v in sw.items()},
            "postgres_not_in_sessions": residual_w,
            "parts": parts,
            "unattributed": total - sum(parts.values()),
        },
        "idle_per_s": {
            "daemon_and_code_servers": idle_servers,
            "postgres": sum(c for _, c in idle_pg.values()) + residual_rate,
            "postgres_sessions": sum(n for n, _ in idle_pg.values()),
        },
        "sessions": {"by_role": {k: v[0] for k, v in sw.items()}, "marginal": sessions},
        "pg_stat_sessions": s1["sessions"] - s0["sessions"],
        "pg_stat_transactions": s1["transactions"] - s0["transactions"],
    }


def _staleness(raw: dict[str, Any], s: dict[str, Any], real_cycle_s: int, real_tick_s: int) -> dict[str, Any]:
    """Per list: a cycle, plus a tick if its probe was deferred, plus the lag from the tick that
    probed it to its verification or import, plus the 2 s margin of the watermark; in the hourly
    promise's cycle and tick (the lag is measured in real seconds)."""
    from mc_pipeline.automation.cadence import Cadence

    plan, tick_s = raw["plan"], raw["tick_s"]
    cadence = Cadence(every_s=plan["lists_every_min"] * 60, tick_s=int(tick_s))
    ticks = [datetime.fromisoformat(t) for t in raw["ticks"]]
    start = raw["snapshots"][0]["t"]
    created = {x["partition"]: x["created"] for x in raw["runs"] if x["kind"] == "incremental"}
    worst, lags, deferred, missing = 0.0, {"verified": 0.0, "imported": 0.0}, 0, []
    for key in raw["keys"]:
        slot_tick = next((t.timestamp() for t in ticks if cadence.slot_in_tick(key, t)), None)
        ev = raw["events"].get(key, {})
        if ev.get("imported", 0) > start:
            how, done, probed = "imported", ev["imported"], created.get(key, ev["imported"])
        elif ev.get("verified") and ev["verified"] > start:
            how, done, probed = "verified", ev["verified"], ev["verified_at"]
        else:
            missing.append(key)
            continue
        if slot_tick is None:
            continue
        d = 1 if probed >= slot_tick + tick_s else 0
        deferred += d
        lag = done - (slot_tick + d * tick_s)
        lags[how] = max(lags[how], lag)
        worst = max(worst, real_cycle_s + d * real_tick_s + lag + 2)
    return {"largest_min": worst / 60, "largest_lag_s": lags, "probed_a_tick_late": deferred, "missing": missing}


def figures(raw: dict[str, Any]) -> dict[str, Any]:
    import psutil

    from mc_pipeline.automation.cadence import Cadence

    plan, s = raw["plan"], split(raw)
    hourly = Cadence()
    probes_per_hour = 3600 / hourly.cycle_s  # each list probed 1.2 times an hour
    n, cores = len(raw["keys"]), psutil.cpu_count() or 1
    changed_share = 1 / plan["lists_changed_every"]
    parts, ticks = s["cpu_s"]["parts"], s["ticks"]
    verified = sum(t["verified"] for t in ticks)
    runs = [x for x in raw["runs"] if x["kind"] == "incremental"]
    others = [x for x in raw["runs"] if x["kind"] != "incremental"]
    per_verification = parts["probes"] / max(verified, 1)
    per_run = parts["runs"] / max(len(runs), 1)
    per_other_run = parts["other_runs"] / max(len(others), 1)
    fixed_h = s["idle_per_s"]["daemon_and_code_servers"] * 3600 + s["idle_per_s"]["postgres"] * 3600
    freshness_h = 4 * per_other_run if others else None  # the freshness check's run, every 15 minutes
    fixed_all_h = fixed_h + (freshness_h or 0.0)
    probes_lh = parts["probes"] / n * probes_per_hour  # every list probed once in the window
    runs_lh = changed_share * per_run
    stale = _staleness(raw, s, hourly.cycle_s, hourly.tick_s)
    sess = s["sessions"]["marginal"]
    sessions_lh = (
        s["idle_per_s"]["postgres_sessions"] * 3600 / n
        + sess["probes"] / n * probes_per_hour
        + changed_share * sess["runs"] / max(len(runs), 1)
    )
    clean = [k for k in raw["keys"] if k.split(":", 1)[0] in set(raw["clean_accounts"])]
    calls_unchanged = raw["mailchimp"]["clean_accounts"] / max(len(clean), 1)
    busy_window = (s["cpu_s"]["total"] - parts["harness"]) / (s["window_s"] * cores)
    busy_hour = (fixed_all_h + n * (probes_lh + runs_lh)) / (3600 * cores)
    run_pg = s["cpu_s"]["postgres_sessions_by_role"]["run-sync"] / max(len(runs), 1)
    run_proc = s["cpu_s"]["processes"]["run-sync"] / max(len(runs), 1)
    launch = max(0.0, per_run - run_proc - run_pg)  # the daemon's side, and PostgreSQL's share for them
    machine = cores * 3600
    keeps = int((machine - fixed_all_h) / max(probes_lh + runs_lh, 1e-9))
    keeps_elsewhere = int((machine - fixed_h) / max(probes_lh + changed_share * (launch + run_pg), 1e-9))
    details = {
        "lists": n,
        "accounts": plan["lists_clients"],
        "changed": len(raw["changed"]),
        "postgres": raw["postgres"],
        "record_synced_state_s": r(raw["record_synced_state_s"], 1),
        "cadence": f"promise {plan['lists_every_min']} min, ticks of {plan['lists_tick_min']} min, "
        f"probe cycle {plan['lists_every_min'] - 2 * plan['lists_tick_min']} min ({len(raw['ticks'])} ticks)",
        "window_s": r(s["window_s"], 1),
        "baseline_s": r(s["baseline_s"], 1),
        "cpu_s": _rounded(s["cpu_s"]),
        "idle_per_s": _rounded(s["idle_per_s"], 4),
        "fixed_cpu_s_per_hour": {
            "daemon_code_servers_postgres": r(fixed_h, 1),
            "freshness_check_runs": r(freshness_h, 1) if freshness_h is not None else "none in the window",
            "per_list_hour_at_1000": r(fixed_all_h / 1000, 4),
            "per_list_hour_at_10000": r(fixed_all_h / 10000, 4),
            "per_list_hour_here": r(fixed_all_h / n, 4),
        },
        "per_verification_cpu_s": r(per_verification, 5),
        "per_run_cpu_s": {
            "total": r(per_run, 3),
            "process": r(run_proc, 3),
            "postgres": r(run_pg, 3),
            "launch_queue_and_pg_share": r(launch, 3),
        },
        "per_list_hour_cpu_s": {"probes": r(probes_lh, 5), "runs": r(runs_lh, 5), "fixed": r(fixed_all_h / n, 5)},
        "sessions": _rounded(s["sessions"], 1),
        "sessions_per_verification": r(sess["probes"] / max(verified, 1), 3),
        "sessions_per_run": r(sess["runs"] / max(len(runs), 1), 1),
        "pg_stat_sessions_window": s["pg_stat_sessions"],
        "pg_stat_transactions_window": s["pg_stat_transactions"],
        "verifications": verified,
        "runs_incremental": len(runs),
        "runs_failed": sum(1 for x in runs if x["status"] != "SUCCESS"),
        "runs_other": len(others),
        "runs_not_changed": sorted({x["partition"] for x in runs} - set(raw["changed"]))[:10],
        "changed_not_run": sorted(set(raw["changed"]) - {x["partition"] for x in runs})[:10],
        "deferred": sum(t["deferred"] for t in ticks),
        "caught_up": sum(t["caught_up"] for t in ticks),
        "staleness": {k: (v if k != "missing" else v[:10]) for k, v in stale.items()},
        "ticks": ticks,
        "mailchimp_calls": raw["mailchimp"],
    }
    return {
        "title": "6. Many lists: one probe cycle of the change-aware schedule, 5% changed (daemon, PostgreSQL)",
        "settings": {
            "lists": f"{plan['lists_clients']} accounts x {plan['lists_per_client']} lists x {plan['lists_members']} "
            f"members; every {plan['lists_changed_every']}th list gets a new member",
            "start": "synced state recorded directly (watermarks.record_imports, batches of 500)",
            "cadence": details["cadence"] + "; figures per list-hour for the hourly promise (cycle 50 min)",
            "instance": f"deploy/dagster.yaml (QueuedRunCoordinator: 8 runs, 1 per account; run monitoring), "
            f"PostgreSQL 15 ({raw['postgres']}); a code server as deployed (dagster code-server start)",
        },
        "figures": [
            figure(
                "6a",
                "CPU s per unchanged list-hour, marginal (probes + their PostgreSQL)",
                r(per_verification * probes_per_hour, 4),
                "<=",
                0.02,
                "s",
                note=f"{r(per_verification, 5)} s a verification, {probes_per_hour:.1f} an hour; fixed "
                f"{r(fixed_all_h, 0)} s/h apart",
            ),
            figure("6b", "PostgreSQL sessions opened per list-hour", r(sessions_lh, 2), "", None),
            figure("6c", f"runs launched ({len(raw['changed'])} lists changed)", len(runs), "<=", len(raw["changed"])),
            figure("6d", "Mailchimp calls per unchanged list", r(calls_unchanged, 2), "<=", 2),
            figure(
                "6e",
                "largest staleness (cycle + deferral + lag), hourly promise",
                r(stale["largest_min"], 1),
                "<=",
                60,
                "min",
            ),
            figure(
                "6f",
                f"busy share of {cores} cores over the window (compressed)",
                r(100 * busy_window, 1),
                "<=",
                25,
                "%",
            ),
            figure(
                "6g", f"busy share of {cores} cores over the real hour, {n} lists", r(100 * busy_hour, 2), "<=", 25, "%"
            ),
            figure("6h", f"lists one {cores}-core machine keeps hourly (runs here)", keeps, ">=", 100_000),
            figure(
                "6h2",
                f"lists one {cores}-core machine keeps hourly (runs elsewhere, PostgreSQL here)",
                keeps_elsewhere,
                ">=",
                100_000,
            ),
            figure("6i", "lists neither imported nor verified in the cycle", len(stale["missing"]), "==", 0),
        ],
        "details": details,
    }


def _rounded(d: Any, n: int = 2) -> Any:
    if isinstance(d, dict):
        return {k: _rounded(v, n) for k, v in d.items()}
    if isinstance(d, list):
        return [_rounded(v, n) for v in d]
    return r(d, n) if isinstance(d, float) else d
