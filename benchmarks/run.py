"""Run the benchmarks of issue #6 and write benchmarks/results/results.{json,md,png}.

    python -m benchmarks.run            # everything, about 35 minutes
    python -m benchmarks.run --quick    # a smoke run of a few minutes (results under results/tmp/quick)
    python -m benchmarks.run --only 1,5 # some scenarios
    python -m benchmarks.run --only 6 --lists-accounts 2000 --lists-every-min 30 --lists-tick-min 3  # 10,000 lists

Each scenario starts its own sandbox (`mc-pipeline sandbox --config ...`) as a separate process
and measures the pipeline in separate worker processes; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks import report
from benchmarks.harness import (
    MC_BASE_MS,
    MC_CONNECTIONS,
    MC_PER_KB_MS,
    OM_BASE_MS,
    OM_BATCH,
    OM_RATE,
    REPO,
    kill_all,
)
from benchmarks.scenarios import SCENARIOS, Context, MachineLoad, Plan

RESULTS = Path(__file__).resolve().parent / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def meta(quick: bool) -> dict[str, Any]:
    import dagster

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = psutil.cpu_count() or 1
    return {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted": [line[3:] for line in _git("status", "--porcelain", "--", "mc_pipeline").splitlines()],
        "quick": quick,
        "cores": cores,
        "machine": f"{cores} cores ({model}), {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "dagster": dagster.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    parser.add_argument("--only", help="comma-separated scenario numbers, e.g. 1,5")
    parser.add_argument("--out", type=Path, help="where results go (default benchmarks/results)")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "tmp", help="scratch space and the page cache")
    parser.add_argument(
        "--merge", action="store_true", help="replace only the scenarios run now in the existing results.json"
    )
    parser.add_argument(
        "--lists-accounts", type=int, help="scenario 6: accounts of 5 lists (default 200; 2000 for 10,000 lists)"
    )
    parser.add_argument(
        "--lists-every-min", type=int, help="scenario 6: the compressed promise in minutes (default 20)"
    )
    parser.add_argument("--lists-tick-min", type=int, help="scenario 6: the schedule's tick in minutes (default 2)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    out = args.out or (RESULTS / "tmp" / "quick" if args.quick else RESULTS)
    sizes = {
        "lists_clients": args.lists_accounts,
        "lists_every_min": args.lists_every_min,
        "lists_tick_min": args.lists_tick_min,
    }
    plan = dataclasses.replace(Plan.make(args.quick), **{k: v for k, v in sizes.items() if v is not None})
    workdir = args.workdir / ("quick" if args.quick else "full")
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{(time.monotonic() - started) / 60:5.1f} min] {msg}", flush=True)

    ctx = Context(plan=plan, workdir=workdir, cache=args.workdir / "cache", log=log)
    results: dict[str, Any] = {
        "meta": meta(args.quick),
        "settings": (
            f"Mailchimp {MC_BASE_MS:.0f} ms + {MC_PER_KB_MS} ms/KiB per request, {MC_CONNECTIONS} connections "
            f"per account; Ometria {OM_BASE_MS:.0f} ms per push, {OM_RATE} requests/s x {OM_BATCH} records "
            "per account"
        ),
        "plan": plan.__dict__,
        "scenarios": {},
        "figures": [],
    }
    if args.merge and (out / "results.json").exists():
        previous = json.loads((out / "results.json").read_text())
        results["scenarios"] = previous["scenarios"]
        results["merged_into"] = previous["meta"]
    failed = False
    try:
        for key in chosen:
            func = SCENARIOS[key]
            log(f"scenario {key}: {func.__name__}")
            load, t0 = MachineLoad(), time.monotonic()
            try:
                result = func(ctx)
            except Exception:
                failed = True
                result = {"title": func.__name__, "error": traceback.format_exc()}
                log(f"scenario {key} failed:\n{result['error']}")
            result["elapsed_s"] = round(time.monotonic() - t0, 1)
            result["when"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            result["machine_busy_cores"] = load.busy_cores()
            results["scenarios"][key] = result
            for fig in result.get("figures", []):
                verdict = {True: "met", False: "NOT met", None: "info"}[fig["met"]]
                log(f"  {fig['id']} {fig['label']}: {fig['value']} ({verdict})")
            results["scenarios"] = dict(sorted(results["scenarios"].items()))
            results["figures"] = [f for sc in results["scenarios"].values() for f in sc.get("figures", [])]
            report.write(results, out)  # after each scenario, so a long run shows progress
    finally:
        kill_all()
    log(f"done; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
