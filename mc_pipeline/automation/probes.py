"""Change-aware incremental syncs: a run only for the lists that changed.

Each list has a stable slot in the cycle (automation/cadence.py); the schedule ticks every few
minutes and takes the lists whose slot falls in the tick, so probes and runs are spread over the
hour. For each, one request of a count and no member asks Mailchimp whether anything changed since
the watermark (and one more for the archived sweep). Nothing: an observation of `ometria/contacts`
records the new watermarks (on Mailchimp's clock) and no run starts. Something, or a probe that
fails or does not answer in time: a run, which imports the change or fails with the error and
alerts. Why moving the watermark is safe: README, "Change-aware".

The probes run in the process that evaluates the schedule (the code server), concurrently across
accounts on a thread pool, each account's requests under its connection gate (resources/limits.py).
That gate is this process's: a run of the account in another process has its own, so a list whose
account has a run in progress is not probed at its tick (the two together could pass the
account's connections). It is deferred to the next tick, the one the cadence leaves for it, and
gets a run only if its account is still busy then.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain, zip_longest
from typing import TypeVar

from dagster import (
    AssetObservation,
    DagsterInstance,
    DagsterRunStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SkipReason,
)

from mc_pipeline.assets.keys import CONTACTS_KEY
from mc_pipeline.assets.models import Destination
from mc_pipeline.assets.watermarks import (
    Watermarks,
    destination_of,
    store_runless,
    verification_metadata,
    watermarks_of,
)
from mc_pipeline.automation.cadence import Cadence, env_int
from mc_pipeline.jobs import sync_run_config
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import Client, RegistryError, YamlClientRegistry, parse_partition_key
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.resources.mailchimp import MailchimpClient
from mc_pipeline.resources.paging import bound_before
from mc_pipeline.tags import MAILCHIMP_ACCOUNT, PARTITION, account_tags, run_tags

T = TypeVar("T")

IN_PROGRESS = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


@dataclass
class TickReport:
    """What one tick did, for its log, the tests and the benchmark."""

    due: int = 0
    verified: list[str] = field(default_factory=list)
    requested: dict[str, str] = field(default_factory=dict)  # partition -> why a run
    busy: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # its account had a run in progress: next tick
    caught_up: int = 0  # lists deferred by the previous tick, probed (or run) in this one
    unknown: list[str] = field(default_factory=list)
    calls: int = 0
    seconds: float = 0.0
    probing_s: float = 0.0  # from the first probe sent to the last answer
    recording_s: float = 0.0  # writing the verifications
    cpu_s: float = 0.0  # this evaluation's threads: the tick's own CPU, whatever else the process does

    def summary(self) -> str:
        return (
            f"{self.due} lists due: {len(self.verified)} verified unchanged, {len(self.requested)} runs requested, "
            f"{len(self.busy)} still syncing, {len(self.deferred)} deferred (their account syncing), "
            f"{self.caught_up} caught up, {len(self.unknown)} of unknown clients; "
            f"{self.calls} Mailchimp calls; {self.seconds:.1f}s ({self.probing_s:.1f}s probing, "
            f"{self.recording_s:.1f}s recording), {self.cpu_s:.2f}s CPU"
        )


def in_progress(instance: DagsterInstance) -> tuple[set[str], set[str]]:
    """Partitions and Mailchimp accounts with a run queued or running, whatever launched it."""
    partitions, accounts = set(), set()
    for record in instance.get_run_records(filters=RunsFilter(statuses=IN_PROGRESS)):
        tags = record.dagster_run.tags
        if PARTITION in tags:
            partitions.add(tags[PARTITION])
        if MAILCHIMP_ACCOUNT in tags:
            accounts.add(tags[MAILCHIMP_ACCOUNT])
    return partitions, accounts


def sync_request(client: Client, key: str, kind: str, period: str, full: bool) -> RunRequest:
    """A sync of one partition, with a run key per partition and period: a tick evaluated twice
    launches nothing twice."""
    return RunRequest(
        partition_key=key,
        run_key=f"{kind}:{key}:{period}",
        run_config=sync_run_config(full_refresh=full),
        tags=run_tags(client, kind),
    )


@dataclass(frozen=True)
class _Probe:
    key: str
    client: Client
    list_id: str
    destination: Destination
    marks: Watermarks


@dataclass(frozen=True)
class _Verified:
    at: datetime  # Mailchimp's clock at the members probe
    watermark: datetime
    archived_watermark: datetime | None


class _Clients:
    """One Mailchimp client per account for the tick, made on first use by the probing threads."""

    def __init__(self, mailchimp: MailchimpResource) -> None:
        self.mailchimp = mailchimp
        self._lock = threading.Lock()
        self._clients: dict[str, MailchimpClient] = {}

    def of(self, client: Client) -> MailchimpClient:
        found = self._clients.get(client.id)
        if found is not None:
            return found
        made = self.mailchimp.client(client)  # outside the lock: the other threads go on meanwhile
        with self._lock:
            found = self._clients.setdefault(client.id, made)
        if found is not made:
            made.close()
        return found

    def close(self) -> None:
        for mc in self._clients.values():
            mc.close()


def probe(mc: MailchimpClient, p: _Probe, sweep_archived: bool) -> tuple[_Verified | str, int]:
    """Verified, or why a run is needed (members changed since the watermark, or archived since the
    archived one); and the calls made. The window's upper bound is Mailchimp's clock, never ours."""
    since, archived_since = p.marks.since, p.marks.archived_since
    changed, clock = mc.changed_since(p.list_id, since)
    if changed:
        return f"{changed} members changed since {_iso(since)}", 1
    watermark = _bound(clock, since)
    if not sweep_archived:
        return _Verified(clock, watermark, archived_since), 1
    archived, archived_clock = mc.changed_since(p.list_id, archived_since, "archived")
    if archived:
        return f"{archived} members archived since {_iso(archived_since)}", 2
    return _Verified(clock, watermark, _bound(archived_clock, archived_since)), 2


def _iso(when: datetime | None) -> str:
    return when.isoformat() if when else "the beginning"


def _bound(clock: datetime, since: datetime | None) -> datetime:
    bound = bound_before(clock)  # the syncs' margin (resources/mailchimp.py): one home
    return max(bound, since) if since is not None else bound


def _by_account_round_robin(probes: list[_Probe]) -> list[_Probe]:
    """One list of each account in turn: the pool's threads start on as many accounts as possible
    instead of queueing at one account's gate."""
    groups: dict[str, list[_Probe]] = defaultdict(list)
    for p in probes:
        groups[account_tags(p.client)[MAILCHIMP_ACCOUNT]].append(p)
    return [p for p in chain.from_iterable(zip_longest(*groups.values())) if p is not None]


def evaluate_tick(
    context: ScheduleEvaluationContext,
    registry: ClientRegistryResource,
    mailchimp: MailchimpResource,
    cadence: Cadence,
    *,
    threads: int | None = None,
    budget_s: float | None = None,
) -> tuple[list[RunRequest] | SkipReason, TickReport]:
    """Probe the lists due in this tick (and those the previous tick deferred); record the verified
    ones; request runs for the others."""
    started, cpu_started = time.monotonic(), time.thread_time()
    threads = threads or env_int("MC_PIPELINE_PROBE_THREADS", 32)
    budget_s = budget_s if budget_s is not None else float(env_int("MC_PIPELINE_PROBE_BUDGET_S", 40))
    tick = context.scheduled_execution_time or datetime.now(UTC)
    report = TickReport()
    try:
        clients = {c.id: c for c in YamlClientRegistry(registry.path).clients()}
    except RegistryError as exc:
        return SkipReason(f"the client registry was refused; no sync launched.\n{exc}"), report
    busy, busy_accounts = in_progress(context.instance)
    requests: list[RunRequest] = []
    candidates: dict[str, tuple[Client, str, Destination]] = {}
    periods: dict[str, str] = {}
    again: set[str] = set()  # due in the previous tick: probed now if that tick deferred them

    def request(client: Client, key: str, why: str) -> None:
        report.requested[key] = why
        requests.append(sync_request(client, key, "incremental", periods[key], full=False))

    for key in context.instance.get_dynamic_partitions(MAILCHIMP_LISTS):
        slot = cadence.slot_in_tick(key, tick)
        if slot is None:
            slot = cadence.deferred_slot(key, tick)
            if slot is None:
                continue
            again.add(key)
        else:
            report.due += 1
        # The slot's own period: asked for again in the next tick, a list still gets one run.
        periods[key] = slot.strftime("%Y-%m-%dT%H:%M" if cadence.cron_override else "%Y-%m-%dT%H:%M:%S")
        client_id, list_id = parse_partition_key(key)
        client = clients.get(client_id)
        if client is None:
            if key not in again:
                report.unknown.append(key)  # the sensor removes partitions of clients gone from the registry
        elif key in busy:
            if key not in again:
                report.busy.append(key)  # its run in progress records its own watermark
        else:
            try:
                candidates[key] = (client, list_id, destination_of(client, list_id))
            except Exception as exc:  # the run fails on the same cause, naming it, and alerts
                if key not in again:  # the previous tick requested that run
                    request(client, key, f"its destination cannot be read: {exc}")
    marks = watermarks_of(context.instance, {k: dest for k, (_, _, dest) in candidates.items()})
    probes = []
    for key, (client, list_id, dest) in candidates.items():
        if key in again:
            if marks[key].why_full or cadence.proved_at_its_tick(marks[key].proved_at, tick):
                continue  # the previous tick verified it, or requested its run
            report.caught_up += 1
        if why := marks[key].why_full:
            request(client, key, why)  # queued behind its account's run if there is one
        elif account_tags(client)[MAILCHIMP_ACCOUNT] in busy_accounts:
            if key in again:
                request(client, key, "a run of its account has been in progress for two ticks: queued behind it")
            else:
                report.deferred.append(key)  # a probe now would pass the account's connections
        else:
            probes.append(_Probe(key, client, list_id, dest, marks[key]))

    accounts = _Clients(mailchimp)
    pool = ThreadPoolExecutor(max(1, min(threads, len(probes))), thread_name_prefix="mc-probe")
    probing = time.monotonic()
    try:
        futures = {
            pool.submit(_timed, lambda p=p: probe(accounts.of(p.client), p, mailchimp.sweep_archived)): p
            for p in _by_account_round_robin(probes)
        }
        done, _ = wait(futures, timeout=max(0.0, budget_s - (time.monotonic() - started)))
        report.probing_s = time.monotonic() - probing
        verified: list[tuple[_Probe, _Verified, int]] = []
        for future, p in futures.items():
            if future not in done:
                future.cancel()
                request(p.client, p.key, f"its probe did not answer within the tick's {budget_s:.0f}s budget")
            elif (error := future.exception()) is not None:
                request(p.client, p.key, f"its probe failed: {error}")
            else:
                (outcome, calls), cpu = future.result()
                report.calls += calls
                report.cpu_s += cpu
                if isinstance(outcome, str):
                    request(p.client, p.key, outcome)
                else:
                    verified.append((p, outcome, calls))
        recording = time.monotonic()
        errors = store_runless(context.instance, [_observation(*v) for v in verified])
        for (p, _, _), error in zip(verified, errors, strict=True):
            if error is not None:
                request(p.client, p.key, f"its verification could not be recorded: {error}")
            else:
                report.verified.append(p.key)
        report.recording_s = time.monotonic() - recording
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        accounts.close()
    report.seconds = time.monotonic() - started
    report.cpu_s += time.thread_time() - cpu_started
    context.log.info(report.summary())
    for key, why in list(report.requested.items())[:50]:
        context.log.info(f"{key}: run requested: {why}")
    if report.unknown:
        context.log.warning(f"{len(report.unknown)} partitions of clients not in the registry: {report.unknown[:20]}")
    return requests or SkipReason(f"nothing to launch: {report.summary()}"), report


def _timed(work: Callable[[], T]) -> tuple[T, float]:
    """The result and the CPU its thread spent on it."""
    cpu = time.thread_time()
    return work(), time.thread_time() - cpu


def _observation(p: _Probe, v: _Verified, calls: int) -> AssetObservation:
    return AssetObservation(
        asset_key=CONTACTS_KEY,
        partition=p.key,
        description=f"verified at {v.at.isoformat()}: nothing changed in ({_iso(p.marks.since)}, "
        f"{v.watermark.isoformat()}], nothing to import",
        metadata={**verification_metadata(p.destination, v.at, v.watermark, v.archived_watermark), "calls": calls},
    )
