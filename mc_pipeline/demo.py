"""`mc-pipeline demo`: the whole product on one machine, against the embedded sandbox.

A real `dagster-daemon` does the work: its sensor turns the registry's lists into partitions
and requests full syncs, the run queue launches them (one run at a time per account), the
hourly schedule (ticking every minute here) runs incremental syncs after the demo changes the
sandbox's Mailchimp lists. At the end the sandbox's Ometria must hold exactly what Mailchimp
lists. Runs land in a project-local instance, so `dagster dev` shows the same history.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mc_pipeline.local import (
    dagster_daemon,
    local_instance_yaml,
    ometria_differences,
    patched_environ,
    sandbox_environment,
)
from mc_pipeline.registry import YamlClientRegistry, parse_partition_key
from mc_pipeline.sandbox import Sandbox, SandboxConfig
from mc_pipeline.tags import SYNC_KIND

TIMEOUT_S = 3600


@dataclass
class RunFigures:
    partition: str
    kind: str
    run_id: str
    members: int = 0  # distinct members in the window, archived ones included (not rows: pages overlap)
    archived: int = 0
    api_calls: int = 0
    pushed: int = 0
    requests: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0


def _print(msg: str = "") -> None:
    print(msg, flush=True)


def run_figures(instance: Any, run_id: str, partition: str, kind: str) -> RunFigures:
    """Members, calls and seconds per step, read back from the run's events in the instance."""
    from dagster import DagsterEventType

    fig = RunFigures(partition=partition, kind=kind, run_id=run_id)
    record = instance.get_run_record_by_id(run_id)
    if record and record.start_time and record.end_time:
        fig.wall = record.end_time - record.start_time
    events = instance.get_records_for_run(
        run_id, of_type={DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.STEP_OUTPUT}
    ).records
    for rec in events:
        event = rec.event_log_entry.dagster_event
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            mat = event.event_specific_data.materialization
            md = {k: v.value for k, v in mat.metadata.items()}
            name = mat.asset_key.to_user_string()
            if name == "mailchimp/member_pages":
                fig.members = md["members"] + md.get("archived_members", 0)
                fig.archived, fig.api_calls = md.get("archived_members", 0), md["api_calls"]
                fig.seconds["fetch"] = md["seconds"]
            elif name == "mailchimp/members":
                fig.seconds["stage"] = md["seconds"]
            elif name == "ometria/contacts":
                fig.pushed, fig.requests = md["pushed"], md["requests"]
                fig.seconds["import"] = md["seconds"]
        elif (event.step_key or "").endswith("to_ometria_records"):
            seconds = (event.event_specific_data.metadata or {}).get("seconds")
            if seconds is not None:
                fig.seconds["transform"] = seconds.value
    return fig


def summary_table(rows: list[RunFigures]) -> str:
    head = (
        f"{'partition':<22} {'sync':<12} {'members':>8} {'archived':>8} {'MC calls':>8} {'pushed':>8} "
        f"{'OM reqs':>7} {'fetch s':>7} {'stage s':>7} {'xform s':>7} {'import s':>8} {'run s':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r.seconds
        lines.append(
            f"{r.partition:<22} {r.kind:<12} {r.members:>8,} {r.archived:>8,} {r.api_calls:>8} {r.pushed:>8,} "
            f"{r.requests:>7} {s.get('fetch', 0):>7.2f} {s.get('stage', 0):>7.2f} {s.get('transform', 0):>7.2f} "
            f"{s.get('import', 0):>8.2f} {r.wall:>6.1f}"
        )
    return "\n".join(lines)


def mutate(sb: Sandbox, list_id: str, rng: random.Random) -> dict[str, int]:
    """New, changed, unsubscribed and cleaned members: what an hour of a real audience looks like."""
    members = sb.mailchimp_list(list_id).members(include_archived=False)
    n = max(5, len(members) // 200)
    picked = rng.sample(members, 3 * n)
    for i in range(n):
        sb.add_member(list_id, f"demo.new.{list_id}.{i}@example.org", merge_fields={"FNAME": "New", "LNAME": f"{i}"})
    for m in picked[:n]:
        sb.update_member(list_id, m["id"], merge_fields={"FNAME": "Changed"})
    for m in picked[n : 2 * n]:
        sb.set_status(list_id, m["id"], "unsubscribed")
    for m in picked[2 * n :]:
        sb.set_status(list_id, m["id"], "cleaned")
    return {"added": n, "changed": n, "unsubscribed": n, "cleaned": n}


class Progress:
    """A status line: rewritten in place on a terminal; elsewhere a line whenever it changes (at
    most every 15 s while only the clock moves), and the last state always, so a log keeps it."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self._state: object = None
        self._at = 0.0
        self._line = self._shown = ""

    def update(self, state: object, line: str) -> None:
        """`state` is what matters (counts); `line` also carries the clock."""
        now = time.monotonic()
        self._line = line
        if state != self._state or now - self._at >= (0.5 if self.tty else 15):
            self._show(line)
            self._at, self._state = now, state

    def close(self) -> None:
        if self.tty:
            print(file=self.out, flush=True)
        elif self._line != self._shown:
            self._show(self._line)

    def _show(self, line: str) -> None:
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=self.out, flush=True)
        self._shown = line


def next_tick_in(now: float, every_s: int = 60) -> float:
    """Seconds until a cron of every `every_s` seconds (the demo's every-minute schedule) fires."""
    return every_s - now % every_s


def status_line(kind: str, done: int, total: int, counts: dict[str, int], pushed: int, elapsed: float) -> str:
    return (
        f"  {kind} syncs: {done}/{total} done, {counts['running']} running, {counts['queued']} queued "
        f"| {pushed:>9,} contacts pushed | {elapsed:6.1f}s"
    )


def waiting_note(waiting_for: str, tick_every_s: int | None, now: float) -> str:
    """What launches the next runs; for a schedule, its last and next tick (the daemon runs a tick a
    few seconds after its time, and a list still busy at a tick waits for the next one)."""
    if not tick_every_s:
        return f" | waiting for {waiting_for}"
    wait = next_tick_in(now, tick_every_s)
    last = time.strftime("%H:%M:%S", time.localtime(now + wait - tick_every_s))
    return f" | waiting for {waiting_for} (ticks every {tick_every_s}s: last {last}, next in {wait:.0f}s)"


def wait_for_syncs(
    instance: Any,
    sb: Sandbox,
    keys: list[str],
    kind: str,
    after: float,
    daemon: Any,
    log: Path,
    waiting_for: str = "mailchimp_lists_sensor",
    tick_every_s: int | None = None,
) -> dict[str, str]:
    """Until every partition has a successful `kind` run started after `after`: {partition: run id}.

    Meanwhile a status line from the instance's runs and the sandbox's counters; while no run is
    queued or running it says what launches them (`waiting_for`) and, for a schedule, when it ticks
    (a list still busy with its full sync at a tick waits for the next one).
    """
    from dagster import DagsterRunStatus, RunsFilter

    progress = Progress()
    started = time.monotonic()
    done: dict[str, str] = {}
    failed: dict[str, str] = {}
    base_pushed = sum(sb.ometria_writes(c.client_id) for c in sb.clients())
    while len(done) + len(failed) < len(keys):
        if daemon.poll() is not None:
            raise RuntimeError(f"dagster-daemon exited ({daemon.returncode}); see {log}")
        if time.monotonic() - started > TIMEOUT_S:
            raise RuntimeError(f"{kind} syncs not done after {TIMEOUT_S}s; see {log}")
        records = instance.get_run_records(filters=RunsFilter(tags={SYNC_KIND: kind}))
        counts = {"queued": 0, "running": 0}
        for rec in records:
            run = rec.dagster_run
            key = run.tags.get("dagster/partition")
            if key not in keys or key in done or (rec.start_time or rec.create_timestamp.timestamp()) < after:
                continue
            if run.status == DagsterRunStatus.SUCCESS:
                done[key] = run.run_id
            elif run.status == DagsterRunStatus.FAILURE:
                failed[key] = run.run_id
                _print(f"\n  FAIL {key}: run {run.run_id} failed (see the Dagster UI)")
            elif run.status == DagsterRunStatus.QUEUED:
                counts["queued"] += 1
            else:
                counts["running"] += 1
        pushed = sum(sb.ometria_writes(c.client_id) for c in sb.clients()) - base_pushed
        state = (len(done), counts["running"], counts["queued"], len(failed))
        left = len(keys) - len(done) - len(failed)
        line = status_line(kind, len(done), len(keys), counts, pushed, time.monotonic() - started)
        if left and not counts["running"] and not counts["queued"]:  # nothing launched yet for the lists left
            line += waiting_note(waiting_for, tick_every_s, time.time())
        progress.update(state, line)
        time.sleep(0.5)
    progress.close()
    return done


def full_refresh_command(partition: str) -> str:
    """The CLI line that syncs one list in full (the README's, from the job's own run config)."""
    from mc_pipeline.jobs import sync_run_config

    return (
        "dagster asset materialize -m mc_pipeline.definitions --select 'mailchimp/member_pages*' "
        f"--partition {partition} --config-json '{json.dumps(sync_run_config(full_refresh=True))}'"
    )


def closing_text(dagster_home: Path, registry: Path, data_dir: Path, env_file: Path, sandbox_command: str) -> str:
    """How to look at the runs, and how to sync more: the sandbox a new command starts is fresh."""
    return (
        "\nThe run history is in a local Dagster instance. To see it in the web UI:\n"
        f"  export DAGSTER_HOME={dagster_home} MC_PIPELINE_CLIENTS={registry} MC_PIPELINE_DATA_DIR={data_dir}\n"
        f"  set -a; . {env_file}; set +a\n"
        "  dagster dev -m mc_pipeline.definitions\n"
        "\nFor more syncs, start the same sandbox in another terminal (it blocks, and prints "
        "'sandbox on ...' once it accepts connections):\n"
        f"  {sandbox_command}\n"
        "It starts fresh from the seed: the same keys and lists, but Mailchimp without the demo's "
        "changes and Ometria empty, while Dagster's watermarks say every list is synced, so an "
        "incremental run would import nothing. Resync with a full refresh of each list first "
        "(in a shell with the exports above):\n"
        f"  for key in $(mc-pipeline partitions list); do {full_refresh_command('$key')}; done"
    )


def run_demo(home: Path, clients: int, sizes: list[int], port: int, seed: int, keep: bool) -> int:
    from dagster import DagsterInstance

    home = home.resolve()
    dagster_home = home / "dagster_home"
    if home.exists() and not keep:
        shutil.rmtree(home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(local_instance_yaml())  # production's queue limits
    config = SandboxConfig.generated(clients=clients, lists_per_client=len(sizes), members=sizes, seed=seed, port=port)
    total = clients * sum(sizes)
    _print(f"Starting the sandbox (seed {seed}): {clients} client(s), {clients * len(sizes)} lists, {total:,} members")
    t0 = time.monotonic()
    settings = {
        "DAGSTER_HOME": str(dagster_home),
        "MC_PIPELINE_SENSOR_INTERVAL_S": "5",
        "MC_PIPELINE_INCREMENTAL_CRON": "* * * * *",  # the hourly schedule, every minute for the demo
    }
    ok = True
    with (
        Sandbox(config) as sb,
        sandbox_environment(config, home, sb, env_file=home / "sandbox.env") as env,
        patched_environ(settings),
    ):
        _print(f"Sandbox ready in {time.monotonic() - t0:.1f}s at {sb.base_url} (Mailchimp /3.0, Ometria /v2)")
        keys = env.partition_keys()
        instance = DagsterInstance.get()
        daemon_log = home / "daemon.log"
        _print(f"Starting dagster-daemon (log: {daemon_log}); its sensor reads the registry {env.registry}")
        with dagster_daemon(daemon_log) as daemon:
            _print(f"\nFull syncs, requested by mailchimp_lists_sensor for {len(keys)} new lists:")
            full = wait_for_syncs(instance, sb, keys, "initial", 0.0, daemon, daemon_log)
            rows = [run_figures(instance, run_id, key, "full") for key, run_id in sorted(full.items())]
            ok = len(full) == len(keys)

            rng = random.Random(seed)
            changes = {key: mutate(sb, parse_partition_key(key)[1], rng) for key in keys}
            changed_at = time.time()
            _print("\nChanged the sandbox's Mailchimp lists:")
            for key, c in changes.items():
                _print(f"  {key}: " + ", ".join(f"{v} {k}" for k, v in c.items()))
            _print("\nIncremental syncs, launched by hourly_incremental_sync (ticking each minute for the demo):")
            # A run whose window ends after the changes: it starts at least 2 s after them.
            incremental = wait_for_syncs(
                instance, sb, keys, "incremental", changed_at + 2, daemon, daemon_log, "hourly_incremental_sync", 60
            )
            rows += [run_figures(instance, run_id, key, "incremental") for key, run_id in sorted(incremental.items())]
            ok = ok and len(incremental) == len(keys)

        _print("\n" + summary_table(rows))
        _print("\nChecking the sandbox's Ometria against Mailchimp:")
        registry = YamlClientRegistry(env.registry)
        for key in keys:
            client_id, list_id = parse_partition_key(key)
            collection = registry.client(client_id).collection(list_id)
            problems = ometria_differences(sb, client_id, list_id, collection)
            if problems:
                ok = False
                _print(f"  FAIL {key}: {'; '.join(problems)}")
            else:
                held = len(sb.ometria_contacts(client_id, collection))
                _print(f"  ok   {key}: Ometria holds exactly the {held:,} contacts Mailchimp lists")
        for account in sb.clients():
            mc, om = sb.stats(f"mailchimp:{account.client_id}"), sb.stats(f"ometria:{account.client_id}")
            _print(
                f"  {account.client_id}: Mailchimp peak {mc['peak_in_flight']} requests in flight, {mc['throttled']} "
                f"answered 429; Ometria {om['requests']} pushes, {om['throttled']} answered 429"
            )
    sizes_arg = ",".join(map(str, sizes))
    command = f"mc-pipeline sandbox --port {port} --seed {seed} --clients {clients} --lists {len(sizes)} "
    command += f"--members {sizes_arg}"
    _print(closing_text(dagster_home, env.registry, env.data_dir, home / "sandbox.env", command))
    return 0 if ok else 1


def main(args: Any) -> int:
    sizes = [int(x) for x in str(args.members).split(",") if x]
    return run_demo(Path(args.home), args.clients, sizes, args.port, args.seed, args.keep)
