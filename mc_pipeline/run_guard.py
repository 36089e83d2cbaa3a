"""One run at a time per list and per account, for the runs the queue does not hold.

The QueuedRunCoordinator limits runs by tag (dagster.yaml): one in progress per
`dagster/partition` and per account tag. Runs started by the CLI (`dagster asset materialize`,
`dagster job execute`) execute in process and never pass the queue, and runs of the asset
graph's implicit job carry no account tags. So each sync also checks, as it starts, the
instance's run storage: it waits for every run in progress that shares its list or one of its
accounts and started before it. The order is the runs' start times, which both sides read the
same way, so of two overlapping runs exactly one waits, and a queued run (not started) never
blocks the one the queue holds it behind.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus, Failure, RunsFilter

from mc_pipeline.registry import RegistryError, parse_partition_key
from mc_pipeline.tags import MAILCHIMP_ACCOUNT, OMETRIA_ACCOUNT, PARTITION, RUN_HOST, RUN_PID, limited_values

# Started and not finished. QUEUED is not here: a queued run holds nothing until it starts.
IN_PROGRESS = [
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]
# A run created but never started (a launch that died), or started and never reaching a sync
# (killed while loading), stops blocking after this.
UNSTARTED_GRACE_S = 120.0

AccountsOf = Callable[[str], Mapping[str, str]]  # client id -> its account tags


def run_limits(tags: Mapping[str, str], accounts_of: AccountsOf) -> set[tuple[str, str]]:
    """What a run holds: its partition, and its accounts (from its tags, else from the registry)."""
    values = limited_values(tags)
    partition = tags.get(PARTITION)
    if partition and not (tags.get(MAILCHIMP_ACCOUNT) and tags.get(OMETRIA_ACCOUNT)):
        try:
            client_id, _ = parse_partition_key(partition)
        except (RegistryError, ValueError):
            return values
        values |= limited_values({**accounts_of(client_id), **{k: v for k, v in tags.items() if v}})
    return values


def host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:63] or "unknown"


def claim(instance: DagsterInstance, run_id: str) -> None:
    """Record this run's host and process, for the runs that will wait for it to tell if it died."""
    instance.add_run_tags(run_id, {RUN_HOST: host(), RUN_PID: str(os.getpid())})


def process_gone(tags: Mapping[str, str]) -> bool:
    """True only when the run's process was on this host and no longer exists (killed outright:
    Dagster then leaves the run "started" for ever, as nothing is left to report its end)."""
    pid = tags.get(RUN_PID, "")
    if tags.get(RUN_HOST) != host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def runs_ahead(
    instance: DagsterInstance, run_id: str, mine: set[tuple[str, str]], accounts_of: AccountsOf, log: Any = None
) -> dict[str, set[tuple[str, str]]]:
    """The runs in progress that share something with this one and started before it (with what
    they share), and those still starting (with nothing: their order is not known yet)."""
    me = instance.get_run_record_by_id(run_id)
    my_order = ((me.start_time if me else None) or time.time(), run_id)
    ahead: dict[str, set[tuple[str, str]]] = {}
    for record in instance.get_run_records(filters=RunsFilter(statuses=IN_PROGRESS)):
        run = record.dagster_run
        if run.run_id == run_id:
            continue
        shared = mine & run_limits(run.tags, accounts_of)
        if not shared:
            continue
        if process_gone(run.tags):
            why = f"its process {run.tags[RUN_PID]} on {run.tags[RUN_HOST]} is gone"
            instance.report_run_failed(run, why)
            if log is not None:
                log.warning(f"run {run.run_id} was still recorded in progress but {why}: marked failed")
            continue
        if record.start_time is None:
            # Starting: it will have a start time in a moment; wait to compare, unless it never will.
            if time.time() - record.create_timestamp.timestamp() > UNSTARTED_GRACE_S:
                continue
            ahead[run.run_id] = set()  # nothing known yet to name
        elif (record.start_time, run.run_id) < my_order:
            if RUN_PID not in run.tags and time.time() - record.start_time > UNSTARTED_GRACE_S:
                continue  # started long ago and never reached a sync: killed while loading, or no sync
            ahead[run.run_id] = shared
        # else it started after this run: it is the one that waits
    return ahead


def wait_for_turn(
    instance: DagsterInstance,
    run_id: str,
    mine: set[tuple[str, str]],
    accounts_of: AccountsOf,
    log: Any,
    *,
    what: str,
    timeout_s: float,
    poll_s: float = 1.0,
) -> float:
    """Block until no earlier run shares `mine`; returns the seconds waited. After `timeout_s`,
    fail naming the runs still in the way (an orphaned run stays "started" until monitoring ends it)."""
    claim(instance, run_id)
    started = time.monotonic()
    told: set[str] = set()
    while True:
        ahead = runs_ahead(instance, run_id, mine, accounts_of, log)
        if not ahead:
            return time.monotonic() - started
        new = sorted(r for r in ahead if ahead[r] and r not in told)  # only runs known to be ahead
        if new:
            told.update(new)
            shared = sorted({f"{k}={v}" for r in new for k, v in ahead[r]})
            log.info(f"{what}: waiting for run(s) {', '.join(new)} in progress with the same {', '.join(shared)}")
        if time.monotonic() - started >= timeout_s:
            raise Failure(
                description=f"{what}: run(s) {', '.join(sorted(ahead))} of the same list or account still in "
                f"progress after {timeout_s:.0f}s; this run did not sync. Cancel them if they are orphaned.",
                metadata={"cause": "concurrent_run", "retryable": False, "blocking_runs": ", ".join(sorted(ahead))},
                allow_retries=False,
            )
        time.sleep(poll_s if any(ahead.values()) else min(poll_s, 0.1))  # a starting run has its time soon
