"""The results as JSON (everything), a markdown table (the figures against their goals) and a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 100):
        text = f"{int(value):,}"
    elif isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip() if unit not in ("", "x", "/s") else f"{text}{unit}"


def _goal(fig: dict[str, Any]) -> str:
    if fig["goal"] is None:
        return "(info)"
    goal = fig["goal"]
    if fig["op"] == "<" and fig["goal"] == 0.01:
        return "< 1%"
    return f"{fig['op']} {_fmt(goal, fig['unit'])}"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"{meta['when']}, commit `{meta['commit']}`"
        + (f" with uncommitted {', '.join(meta['uncommitted'])}" if meta.get("uncommitted") else "")
        + f"{' (quick run)' if meta['quick'] else ''}; "
        f"{meta['machine']}; Python {meta['python']}, Dagster {meta['dagster']}.",
        "",
        f"Settings: {results['settings']}",
        "",
        "| # | figure | value | goal | met |",
        "|---|---|---|---|---|",
    ]
    for fig in results["figures"]:
        met = {True: "yes", False: "**no**", None: ""}[fig["met"]]
        lines.append(f"| {fig['id']} | {fig['label']} | {_fmt(fig['value'], fig['unit'])} | {_goal(fig)} | {met} |")
    errors = {k: v["error"].strip().splitlines()[-1] for k, v in results["scenarios"].items() if "error" in v}
    if errors:
        lines += ["", "Scenarios that did not finish: " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
    lines += ["", "Per scenario (wall minutes, busy cores of the whole machine while it ran):", ""]
    for key, sc in results["scenarios"].items():
        lines.append(
            f"- {sc.get('title', key)}: {sc.get('elapsed_s', 0) / 60:.1f} min, "
            f"{sc.get('machine_busy_cores', '-')} busy cores"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Four panels: every goal's headroom, scaling with clients, memory, CPU before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    sc = results["scenarios"]

    ax = axes[0][0]
    goals = [f for f in results["figures"] if f["goal"] not in (None, 0) and f["op"] in (">=", "<=", "<")]
    labels, scores, colors = [], [], []
    for f in goals:
        value = f["value"] or 0
        score = value / f["goal"] if f["op"] == ">=" else (f["goal"] / value if value else 2.0)
        score = min(score, 2.0)  # an upper limit with nothing measured (0 429s) shows as far within it
        labels.append(f"{f['id']} {f['label'][:48]}")
        scores.append(score)
        colors.append("tab:green" if f["met"] else "tab:red")
    ax.barh(range(len(scores)), scores, color=colors)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(scores)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("measured / goal (>= 1 meets it; for upper limits goal / measured; capped at 2)")
    ax.set_title("Goals")

    ax = axes[0][1]
    many = sc.get("7", {}).get("details")
    if many:
        ks = [row["clients"] for row in many["extraction"]]
        thr = [row["members_per_s"] / 1000 for row in many["extraction"]]
        ax.plot(ks, thr, "o-", label="extraction, all clients (k members/s)")
        ax.plot(ks, [k * thr[0] for k in ks], "--", color="gray", label="linear")
        imp = many.get("import") or []
        if imp:
            ki = [row["clients"] for row in imp]
            ax.plot(
                ki, [row["records_per_s"] / 100 for row in imp], "^-", color="tab:green", label="import (100 records/s)"
            )
            ax.plot(ki, [k * imp[0]["records_per_s"] / 100 for k in ki], ":", color="tab:green")
        busy = ax.twinx()
        busy.plot(ks, [row["machine_busy_cores"] for row in many["extraction"]], "s:", color="tab:red")
        busy.set_ylabel("busy cores (red)")
        busy.set_ylim(0, (results["meta"].get("cores") or 2) + 0.5)
        ax.set_xlabel("clients syncing at once (one process each)")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title("7. Many clients")

    ax = axes[1][0]
    mem = sc.get("4", {}).get("details")
    if mem:
        sizes = list(mem["runs"])
        ax.bar([f"{int(s):,}" for s in sizes], [mem["runs"][s]["peak_rss_mib"] for s in sizes], color="tab:blue")
        ax.axhline(1024, color="tab:red", lw=1, label="1 GiB")
        ax.set_xlabel("members in the full sync")
        ax.set_ylabel("peak RSS of the sync's process (MiB)")
        ax.legend(fontsize=8)
    ax.set_title("4. Memory")

    ax = axes[1][1]
    cpu = sc.get("5", {}).get("details")
    if cpu:
        names, values = [], []
        if "before" in cpu:
            names.append("before")
            values.append(cpu["before"]["members_per_s_per_core"] / 1000)
        names.append("after")
        values.append(cpu["after"]["members_per_s_per_core"] / 1000)
        if "floor" in cpu:
            names.append("JSON read alone")
            values.append(cpu["floor"]["arrow_json_members_per_s"] / 1000)
        ax.bar(names, values, color="tab:purple")
        ax.axhline(150, color="tab:red", lw=1, label="goal 150k")
        ax.set_ylabel("k members / s / core")
        ax.legend(fontsize=8)
    ax.set_title("5. CPU: pages -> staged rows -> records")

    fig.suptitle(f"mc-pipeline benchmarks ({results['meta']['when']}, {results['meta']['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "results.png")


if __name__ == "__main__":  # redraw the table and plot from a results.json: python -m benchmarks.report DIR
    import json
    import sys

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    write(json.loads((folder / "results.json").read_text()), folder)
