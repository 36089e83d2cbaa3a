"""Extraction against the connection bound, this commit against a base commit in one run (issue 11, item 7).

    python -m benchmarks.bound --members 200000 --rounds 3 [--base 6bb7403]

One sandbox (the harness's latencies: 250 ms + 0.15 ms/KiB per request, 10 connections); for each
round, the `extract` worker (scenario 1's: `MailchimpClient.fetch` over the whole list, pages gzipped
to disk) runs once with this tree's `mc_pipeline` and once with the base commit's (from `git archive`,
the worker started in that copy so it imports it), alternating. Each pass's throughput is over the bound
10 x 1000 / page latency of its own measured page size; the best of the rounds is reported (the machine
is shared: the best pass is the one least disturbed), with the median, and each pass decomposed as in
scenario 1 (`harness.decompose`: overlap x latency x slot use, and its schedule's ceiling).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, decompose, kill_all, run_worker, sandbox, sandbox_config

RESULTS = REPO / "benchmarks" / "results"


def checkout(rev: str, dest: Path) -> Path:
    """`mc_pipeline` of `rev` in `dest`, beside a link to this tree's `benchmarks` (the worker's code)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "mc_pipeline"], cwd=REPO, check=True, capture_output=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    (dest / "benchmarks").symlink_to(REPO / "benchmarks")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", default="6bb7403", help="the commit compared with (default: a count first)")
    args = parser.parse_args(argv)
    work = RESULTS / "tmp" / f"bound-{args.members}"
    trees = {"this": REPO, "base": checkout(args.base, work / "base")}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    try:
        with sandbox(sandbox_config({"extract": [args.members]}), work / "sandbox") as sb:
            env = sb.env(work / "data")
            list_id = sb.lists("extract")[0]
            for i in range(args.rounds):
                for name, tree in trees.items():
                    w = run_worker(
                        "extract",
                        {"client_id": "extract", "list_id": list_id, "scratch": str(work / "pages"), "warmup": 1},
                        work,
                        env={**env, "PYTHONPATH": str(tree)},
                        cwd=tree,
                        name=f"extract-{name}",
                    )
                    run = decompose(w.output["runs"][0])
                    runs[name].append(run)
                    print(
                        f"round {i}: {name:4s} {run['wall_s']:.2f} s, {run['ratio']:.3f} of the bound = overlap "
                        f"{run['overlap_factor']} x latency {run['latency_factor']} x slot use {run['slot_use']}; "
                        f"schedule ceiling {run['schedule_ceiling']} ({run['requests']} requests, "
                        f"{run['first_wave']} before the first answer)",
                        flush=True,
                    )
    finally:
        kill_all()
    summary = {
        name: {
            "best": round(max(r["ratio"] for r in rs), 3),
            "median": round(statistics.median(r["ratio"] for r in rs), 3),
            "wall_s": [round(r["wall_s"], 2) for r in rs],
            "requests": rs[0]["requests"],
            "pages": rs[0]["pages"],
            "runs": rs,  # each measured pass, decomposed
        }
        for name, rs in runs.items()
    }
    out = {"members": args.members, "base": args.base, "rounds": args.rounds, "summary": summary}
    (RESULTS / f"bound-{args.members}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
