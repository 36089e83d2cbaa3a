"""`mc-pipeline demo`: the whole product on one machine, against the embedded sandbox.

Full syncs of a client's two lists through Dagster, changes made in the sandbox's Mailchimp,
an incremental sync, then a check that the sandbox's Ometria holds exactly what Mailchimp
lists. Runs land in a project-local Dagster instance, so `dagster dev` shows the same history.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mc_pipeline.local import LocalEnvironment, ometria_differences, patched_environ, sandbox_environment
from mc_pipeline.registry import parse_partition_key
from mc_pipeline.sandbox import Sandbox, SandboxConfig
from mc_pipeline.sandbox.registry import key_environment


@dataclass
class StepFigures:
    partition: str
    kind: str
    members: int = 0
    api_calls: int = 0
    pages: int = 0
    pushed: int = 0
    requests: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0


def _print(msg: str = "") -> None:
    print(msg, flush=True)


@contextmanager
def progress(sb: Sandbox, partition: str, label: str) -> Iterator[None]:
    """One status line, redrawn twice a second from what the sandbox has served so far."""
    client_id, list_id = parse_partition_key(partition)
    stop = threading.Event()
    started = time.monotonic()
    base_writes = sb.ometria_writes(client_id)
    tty = sys.stdout.isatty()

    def draw() -> None:
        while not stop.wait(0.5 if tty else 10):
            log = sb.request_log(f"mailchimp:{client_id}")
            pages = sum(1 for r in log if r.started >= started and list_id in r.path and r.status == 200)
            pushed = sb.ometria_writes(client_id) - base_writes
            elapsed = time.monotonic() - started
            line = f"  {label:<34} {pages:>4} pages fetched   {pushed:>8,} contacts pushed   {elapsed:6.1f}s"
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if tty:
            print("\r" + " " * 100 + "\r", end="", flush=True)


def run_sync(instance: Any, partition: str, full_refresh: bool) -> tuple[Any, float]:
    from mc_pipeline.definitions import defs
    from mc_pipeline.jobs import SYNC_JOB, sync_run_config
    from mc_pipeline.partitions import MAILCHIMP_LISTS

    if not instance.has_dynamic_partition(MAILCHIMP_LISTS, partition):
        instance.add_dynamic_partitions(MAILCHIMP_LISTS, [partition])
    started = time.monotonic()
    result = defs.resolve_job_def(SYNC_JOB).execute_in_process(
        instance=instance, partition_key=partition, run_config=sync_run_config(full_refresh), raise_on_error=False
    )
    return result, time.monotonic() - started


def figures(result: Any, partition: str, kind: str, wall: float) -> StepFigures:
    fig = StepFigures(partition=partition, kind=kind, wall=wall)
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        md = {k: v.value for k, v in mat.metadata.items()}
        name = mat.asset_key.to_user_string()
        if name == "mailchimp/member_pages":
            fig.members, fig.api_calls, fig.pages = md["members"], md["api_calls"], md["pages"]
            fig.seconds["fetch"] = md["seconds"]
        elif name == "mailchimp/members":
            fig.seconds["stage"] = md["seconds"]
        elif name == "ometria/contacts":
            fig.pushed, fig.requests = md["pushed"], md["requests"]
            fig.seconds["import"] = md["seconds"]
    for event in result.all_events:  # the transform op's own output carries its timing
        if event.event_type_value == "STEP_OUTPUT" and (event.step_key or "").endswith("to_ometria_records"):
            seconds = (event.event_specific_data.metadata or {}).get("seconds")
            if seconds is not None:
                fig.seconds["transform"] = seconds.value
    return fig


def summary_table(rows: list[StepFigures]) -> str:
    head = (
        f"{'partition':<22} {'sync':<12} {'members':>8} {'MC calls':>8} {'pushed':>8} {'OM reqs':>7} "
        f"{'fetch s':>7} {'stage s':>7} {'xform s':>7} {'import s':>8} {'total s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r.seconds
        lines.append(
            f"{r.partition:<22} {r.kind:<12} {r.members:>8,} {r.api_calls:>8} {r.pushed:>8,} {r.requests:>7} "
            f"{s.get('fetch', 0):>7.2f} {s.get('stage', 0):>7.2f} {s.get('transform', 0):>7.2f} "
            f"{s.get('import', 0):>8.2f} {r.wall:>7.1f}"
        )
    return "\n".join(lines)


def mutate(sb: Sandbox, list_id: str, rng: random.Random) -> dict[str, int]:
    """New, changed, unsubscribed and cleaned members: what an hour of a real audience looks like."""
    members = sb.mailchimp_list(list_id).members(include_archived=False)
    n = max(5, len(members) // 200)
    picked = rng.sample(members, 3 * n)
    for i in range(n):
        sb.add_member(
            list_id, f"demo.new.{list_id}.{i}@example.org", merge_fields={"FNAME": "New", "LNAME": f"Member {i}"}
        )
    for m in picked[:n]:
        sb.update_member(list_id, m["id"], merge_fields={"FNAME": "Changed"})
    for m in picked[n : 2 * n]:
        sb.set_status(list_id, m["id"], "unsubscribed")
    for m in picked[2 * n :]:
        sb.set_status(list_id, m["id"], "cleaned")
    return {"added": n, "changed": n, "unsubscribed": n, "cleaned": n}


def run_demo(home: Path, sizes: list[int], port: int, seed: int, keep: bool) -> int:
    from dagster import DagsterInstance

    home = home.resolve()
    dagster_home = home / "dagster_home"
    if home.exists() and not keep:
        shutil.rmtree(home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    config = SandboxConfig.generated(clients=1, lists_per_client=len(sizes), members=sizes, seed=seed, port=port)
    _print(f"Starting the sandbox (seed {seed}): generating {sum(sizes):,} Mailchimp members ...")
    t0 = time.monotonic()
    with (
        Sandbox(config) as sb,
        sandbox_environment(config, home, sb) as env,
        patched_environ({"DAGSTER_HOME": str(dagster_home)}),
    ):
        _print(f"Sandbox ready in {time.monotonic() - t0:.1f}s at {sb.base_url} (Mailchimp /3.0, Ometria /v2)")
        env_file = home / "sandbox.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in key_environment(config).items()))
        env_file.chmod(0o600)
        instance = DagsterInstance.get()
        rows: list[StepFigures] = []
        ok = _phase(env, instance, rows, "full sync", full_refresh=True)
        rng = random.Random(seed)
        changes = {}
        for partition in env.partition_keys():
            changes[partition] = mutate(sb, parse_partition_key(partition)[1], rng)
        _print(
            "\nChanged the sandbox's Mailchimp lists: "
            + "; ".join(f"{p}: {', '.join(f'{v} {k}' for k, v in c.items())}" for p, c in changes.items())
        )
        time.sleep(2.1)  # the window ends a second before the run starts: let the changes fall inside it
        ok = _phase(env, instance, rows, "incremental", full_refresh=False) and ok
        _print("\n" + summary_table(rows))
        _print("\nChecking the sandbox's Ometria against Mailchimp ...")
        from mc_pipeline.registry import YamlClientRegistry

        registry = YamlClientRegistry(env.registry)
        for partition in env.partition_keys():
            client_id, list_id = parse_partition_key(partition)
            collection = registry.client(client_id).collection(list_id)
            problems = ometria_differences(sb, client_id, list_id, collection)
            held = len(sb.ometria_contacts(client_id, collection))
            if problems:
                ok = False
                _print(f"  FAIL {partition}: {'; '.join(problems)}")
            else:
                _print(f"  ok   {partition}: Ometria holds exactly the {held:,} contacts Mailchimp lists")
    _print(
        "\nThe run history is in a local Dagster instance. To see it in the web UI:\n"
        f"  export DAGSTER_HOME={dagster_home}\n"
        f"  export MC_PIPELINE_CLIENTS={env.registry} MC_PIPELINE_DATA_DIR={env.data_dir}\n"
        f"  set -a; . {home / 'sandbox.env'}; set +a\n"
        f"  mc-pipeline sandbox --port {port} --seed {seed} --members {','.join(map(str, sizes))} &"
        "   # the same keys and lists, to run more syncs\n"
        "  dagster dev -m mc_pipeline.definitions"
    )
    return 0 if ok else 1


def _phase(env: LocalEnvironment, instance: Any, rows: list[StepFigures], kind: str, full_refresh: bool) -> bool:
    _print(f"\n{kind.capitalize()} of {len(env.partition_keys())} lists through Dagster:")
    ok = True
    for partition in env.partition_keys():
        with progress(env.sandbox, partition, f"{partition} ({kind})"):
            result, wall = run_sync(instance, partition, full_refresh)
        if not result.success:
            ok = False
            failure = next((e for e in result.all_events if e.event_type_value == "STEP_FAILURE"), None)
            _print(f"  FAIL {partition}: {failure.message if failure else 'run failed'}")
            continue
        fig = figures(result, partition, kind, wall)
        rows.append(fig)
        _print(
            f"  {partition:<22} {fig.members:>8,} members, {fig.api_calls} Mailchimp calls, "
            f"{fig.pushed:,} contacts in {fig.requests} pushes, {wall:.1f}s (run {result.run_id[:8]})"
        )
    return ok


def main(args: Any) -> int:
    sizes = [int(x) for x in str(args.members).split(",") if x]
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    return run_demo(Path(args.home), sizes, args.port, args.seed, args.keep)
