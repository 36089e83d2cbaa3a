"""Scenario 8 (issue 11, item 4): a full refresh of an unchanged list pushes nothing, in about the
time Mailchimp's extraction takes; an incremental where `last_changed` moved on many members but
few records changed pushes only those few.

One sandbox (its own process) holds one list of `refresh_members`. The list is synced once (the
Ometria limit raised and the registry's `ometria.requests_per_second: 100`, as scenario 4, so the
initial push is short; not measured against a goal), then, each sync job run in its own worker
process against the same Dagster instance and data folder:
  A. a full refresh of the unchanged list: wall time per step, the process's CPU, contacts pushed
     (goal 0, and 0 Ometria requests seen by the sandbox) and wall time over the extraction bound
     (members / (10 x 1000 / page latency), scenario 1's; goal <= 1.2), with its breakdown;
  B. `last_changed` bumped on `refresh_bumped` subscribed members through the sandbox's admin API,
     `refresh_changed` of them with a new FNAME (a change Ometria receives), then an incremental
     sync: contacts pushed (goal `refresh_changed`).
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import requests

from benchmarks.harness import run_worker, sandbox, sandbox_config
from benchmarks.scenarios import Context, _server, _sync_summary, figure, r

STEPS = {
    "mailchimp__member_pages": "extraction",
    "mailchimp__members": "staging",
    "ometria__contacts.to_ometria_records": "transform",
    "ometria__contacts.import_to_ometria": "import (skip pass, recording, deletions judged)",
    "ometria__contacts_counts_reconcile": "asset checks",
    "ometria__contacts_dead_letters_within_share": "asset checks",
}


def _admin(base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{base_url}/_sandbox/{path}", json=body, timeout=60)
    response.raise_for_status()
    return dict(response.json())


def _subscribed(data_dir: Path, n: int) -> list[str]:
    """The ids of `n` subscribed members, from the staging file of the newest run."""
    newest = max(data_dir.glob("lists/*/*/runs/*/members.parquet"), key=lambda p: p.stat().st_mtime)
    staged = pq.read_table(newest, columns=["member_id", "status"])
    ids = staged.filter(pc.equal(staged.column("status"), "subscribed")).column("member_id")
    return [str(x) for x in ids.slice(0, n).to_pylist()]


def _bump(base_url: str, list_id: str, ids: list[str], changed: int) -> float:
    """PATCH every member (an update Mailchimp stamps with a new last_changed); the first `changed`
    get a new FNAME, so their Ometria record changes. Returns the seconds it took."""
    started = time.perf_counter()
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=8)
    session.mount("http://", adapter)

    def patch(i: int) -> None:
        body = {"merge_fields": {"FNAME": f"Changed{i}"}} if i < changed else {}
        url = f"{base_url}/_sandbox/mailchimp/lists/{list_id}/members/{ids[i]}"
        session.patch(url, json=body, timeout=60).raise_for_status()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(patch, range(len(ids))))
    session.close()
    return time.perf_counter() - started


def _breakdown(summary: dict[str, Any], contacts: dict[str, Any]) -> dict[str, Any]:
    """Each step's seconds and share of the extraction bound; the run's overhead is the rest."""
    bound = summary["bound_extract_s"]
    steps = summary["step_seconds"]
    parts: dict[str, float] = {}
    for key, label in STEPS.items():
        parts[label] = parts.get(label, 0.0) + steps.get(key, 0.0)
    parts["run overhead (launch, events, I/O managers, between steps)"] = summary["wall_s"] - sum(steps.values())
    out = {k: {"seconds": r(v), "of_bound": r(v / bound)} for k, v in parts.items()}
    seconds, reconcile = contacts.get("seconds", 0.0), contacts.get("reconcile_seconds", 0.0)
    out["import: skip pass and recording"] = {
        "seconds": r(seconds - reconcile),
        "of_bound": r((seconds - reconcile) / bound),
    }
    out["import: deletions judged (the known contacts folded)"] = {
        "seconds": r(reconcile),
        "of_bound": r(reconcile / bound),
    }
    return out


def run_refresh(ctx: Context) -> dict[str, Any]:
    p = ctx.plan
    work = ctx.dir("8_refresh")
    n, bumped, changed = p.refresh_members, p.refresh_bumped, p.refresh_changed
    home, data = work / "dagster_home", work / "data"
    for d in (home, data):
        shutil.rmtree(d, ignore_errors=True)
    home.mkdir()
    cfg = sandbox_config({"refresh": [n]}, om_rate=2000, om_drain_per_s=1e7, om_backlog=10**9)
    ctx.log(f"  sandbox with {n:,} members (generating takes a while)")
    with sandbox(cfg, work / "sandbox", ometria_requests_per_second=p.memory_ometria_rps) as sb:
        list_id = sb.lists("refresh")[0]
        partition = f"refresh:{list_id}"
        env = {**sb.env(data), "DAGSTER_HOME": str(home)}

        def sync(name: str, full_refresh: bool, **extra: Any) -> tuple[Any, dict[str, Any]]:
            w = run_worker(
                "sync",
                {"partitions": [partition], "full_refresh": full_refresh, **extra},
                work,
                env=env,
                name=name,
                timeout_s=3600,
            )
            run = w.output["runs"][0]
            if not run["success"]:
                raise RuntimeError(f"the {name} sync failed: {run}")
            return w, run

        ctx.log(f"  initial full sync of {n:,} members (pushes everything at the raised limit)")
        initial_w, initial = sync("sync-initial", True, ometria={"workers": 16})

        _admin(sb.base_url, "clock", {"advance": 2})
        _admin(sb.base_url, "reset", {})
        ctx.log("  A: full refresh of the unchanged list")
        refresh_w, refresh = sync("sync-refresh", True)
        refresh_server = sb.requests_by_label()

        ids = _subscribed(data, bumped)
        if len(ids) < bumped:
            raise RuntimeError(f"only {len(ids)} subscribed members to bump, {bumped} wanted")
        ctx.log(f"  B: last_changed bumped on {bumped:,} members, {changed} of them changed for Ometria")
        _admin(sb.base_url, "clock", {"advance": 2})
        bump_s = _bump(sb.base_url, list_id, ids, changed)
        _admin(sb.base_url, "clock", {"advance": 2})  # the changes fall inside the window (paging.CLOCK_MARGIN_S)
        _admin(sb.base_url, "reset", {})
        incremental_w, incremental = sync("sync-incremental", False)
        incremental_server = sb.requests_by_label()

    a, b = _sync_summary(refresh), _sync_summary(incremental)
    a_contacts, b_contacts = refresh["metadata"]["ometria/contacts"], incremental["metadata"]["ometria/contacts"]
    a_requests = refresh_server.get("ometria:refresh", {}).get("requests", 0)
    b_requests = incremental_server.get("ometria:refresh", {}).get("requests", 0)
    ratio = r(a["wall_s"] / a["bound_extract_s"])
    return {
        "title": "8. Push only what changed (full refresh of an unchanged list; bumps that change nothing)",
        "settings": {
            "members": n,
            "bumped": bumped,
            "changed": changed,
            "initial sync": f"registry requests_per_second {p.memory_ometria_rps:g}, sandbox limit raised, 16 pushers",
        },
        "figures": [
            figure("8a", f"full refresh of an unchanged {n:,}-member list: contacts pushed", a["pushed"], "==", 0),
            figure("8b", "full refresh of an unchanged list: wall time over the extraction bound", ratio, "<=", 1.2),
            figure(
                "8c",
                f"incremental, last_changed bumped on {bumped:,} members, {changed} changed: contacts pushed",
                b["pushed"],
                "==",
                changed,
            ),
        ],
        "details": {
            "A_full_refresh": {
                **a,
                "process": refresh_w.as_dict(),
                "records": a_contacts.get("records"),
                "unchanged_skipped": a_contacts.get("unchanged_skipped"),
                "deleted_in_mailchimp_opted_out": a_contacts.get("deleted_in_mailchimp_opted_out"),
                "ometria_requests_seen_by_the_sandbox": a_requests,
                "import_op_seconds": a_contacts.get("seconds"),
                "import_reconcile_seconds": a_contacts.get("reconcile_seconds"),
                "breakdown": _breakdown(a, a_contacts),
                "server": {k: _server(v) for k, v in refresh_server.items()},
            },
            "B_incremental": {
                **b,
                "process": incremental_w.as_dict(),
                "records": b_contacts.get("records"),
                "unchanged_skipped": b_contacts.get("unchanged_skipped"),
                "accepted": b_contacts.get("accepted"),
                "ometria_requests_seen_by_the_sandbox": b_requests,
                "bump_seconds": r(bump_s),
            },
            "initial_sync": {**_sync_summary(initial), "process": initial_w.as_dict()},
        },
    }
