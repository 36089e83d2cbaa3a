"""Sensors: partitions follow the registry; failed syncs are recorded and alerted.

`mailchimp_lists_sensor` makes the registry the source of truth for which partitions exist.
Its work per tick is bounded (new partitions, `lists: all` accounts re-read) and its cursor
remembers what `all` resolved to, so a registry of thousands of lists costs a tick little and
a burst of new clients never floods the run queue.

It never deletes partitions because of a passing state of the file: a registry that is empty
or does not parse is refused; a deletion waits until two ticks read the same registry; and one
that would remove half of the partitions or more (or lists half as many lists as the last one
accepted) is held, changing nothing, until the clients taken out are named under `removed:` in
the registry (see `registry_guard`).
"""

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import requests
from dagster import (
    AddDynamicPartitionsRequest,
    AssetObservation,
    DagsterRunStatus,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    RunFailureSensorContext,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from mc_pipeline.assets.keys import CONTACTS_KEY
from mc_pipeline.automation.registry_guard import CONFIRM_HINT, reading, shrink
from mc_pipeline.jobs import sync_job, sync_run_config
from mc_pipeline.partitions import MAILCHIMP_LISTS, mailchimp_lists
from mc_pipeline.registry import (
    LIST_ID_RE,
    Client,
    RegistryError,
    SecretError,
    YamlClientRegistry,
    parse_partition_key,
    partition_key,
)
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.resources.errors import ApiError
from mc_pipeline.tags import run_tags

log = logging.getLogger(__name__)

SENSOR_INTERVAL_S = int(os.environ.get("MC_PIPELINE_SENSOR_INTERVAL_S", "60"))
MAX_NEW_PER_TICK = int(os.environ.get("MC_PIPELINE_SENSOR_MAX_NEW", "100"))
MAX_DELETED_PER_TICK = 500
MAX_ALL_REFRESHES_PER_TICK = 10  # `lists: all` accounts whose audiences are re-read per tick
ALL_REFRESH_S = 3600  # how old a cached `all` answer may be


@dataclass
class SensorCursor:
    """What `lists: all` resolved to, per client: {client_id: {"lists": [...], "at": epoch}};
    how many lists the last registry accepted stood for; since when a shrinking one is held;
    the last tick's `reading` of the registry (deletions wait until two ticks agree)."""

    all_lists: dict[str, dict[str, Any]] = field(default_factory=dict)
    size: int | None = None
    held_since: float | None = None
    seen: str | None = None

    @classmethod
    def load(cls, raw: str | None) -> "SensorCursor":
        try:
            data = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            data = {}
        return cls(dict(data.get("all", {})), data.get("size"), data.get("held_since"), data.get("seen"))

    def dump(self) -> str:
        data = {"v": 1, "all": self.all_lists, "size": self.size, "held_since": self.held_since, "seen": self.seen}
        return json.dumps(data, separators=(",", ":"), sort_keys=True)


@dataclass
class Desired:
    keys: dict[str, Client]  # partition key -> its client
    unknown_clients: set[str]  # `all` clients not resolved yet or failing: keep their partitions
    refreshed: list[str]
    errors: list[str]


def desired_partitions(
    clients: list[Client], cursor: SensorCursor, mailchimp: MailchimpResource, now: float
) -> Desired:
    keys: dict[str, Client] = {}
    unknown: set[str] = set()
    refreshed: list[str] = []
    errors: list[str] = []
    stale = sorted(
        (c for c in clients if c.lists == "all"),
        key=lambda c: cursor.all_lists.get(c.id, {}).get("at", 0),
    )
    budget = MAX_ALL_REFRESHES_PER_TICK
    for client in stale:
        entry = cursor.all_lists.get(client.id)
        if budget and (entry is None or now - entry.get("at", 0) >= ALL_REFRESH_S):
            budget -= 1
            try:
                with mailchimp.client(client) as mc:
                    ids = [x["id"] for x in mc.lists() if LIST_ID_RE.fullmatch(str(x.get("id")))]
                cursor.all_lists[client.id] = {"lists": sorted(ids), "at": now}
                refreshed.append(client.id)
            except (ApiError, SecretError) as exc:
                errors.append(str(exc))
                unknown.add(client.id)
    for client in clients:
        if client.lists == "all":
            entry = cursor.all_lists.get(client.id)
            if entry is None:
                unknown.add(client.id)
                continue
            list_ids = entry["lists"]
        else:
            list_ids = client.lists
        for list_id in list_ids:
            keys[partition_key(client.id, list_id)] = client
    known = {c.id for c in clients}
    cursor.all_lists = {k: v for k, v in cursor.all_lists.items() if k in known}
    return Desired(keys, unknown, refreshed, errors)


@sensor(
    name="mailchimp_lists_sensor",
    job=sync_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition (and a full sync) for each client list in the registry; removes those gone, "
    "but holds a registry that would remove half or more at once unless it names them under `removed:`.",
)
def mailchimp_lists_sensor(
    context: SensorEvaluationContext, registry: ClientRegistryResource, mailchimp: MailchimpResource
) -> SensorResult | SkipReason:
    """Partitions follow the registry; deletions only once two ticks read the same registry.

    To remove many clients (half of the partitions or more, or a registry half the size of the
    last one or smaller), an operator names them under `removed:` in the registry file
    (client ids or `client:list` keys), next to the shortened `clients:`; the tick after, their
    partitions are deleted (500 a tick). Until then the tick changes nothing and says so in its
    skip reason. `removed:` may be emptied once they are gone.
    """
    reg = YamlClientRegistry(registry.path)  # re-read each tick: the file is the truth
    try:
        clients = reg.clients()
    except RegistryError as exc:
        context.log.error(str(exc))
        return SkipReason(f"the client registry was refused; no partition changed.\n{exc}")
    cursor = SensorCursor.load(context.cursor)
    now = time.time()
    resolved_before = dict(cursor.all_lists)
    desired = desired_partitions(clients, cursor, mailchimp, now)
    for error in desired.errors:
        context.log.warning(f"could not list a client's audiences (its partitions are kept): {error}")

    existing = set(context.instance.get_dynamic_partitions(MAILCHIMP_LISTS))
    kept = {k for k in existing - set(desired.keys) if _client_of(k) in desired.unknown_clients}
    every_gone = sorted(existing - set(desired.keys) - kept)
    change = shrink(existing, every_gone, len(desired.keys) + len(kept), cursor.size, reg.removes)
    settled, cursor.seen = cursor.seen == reading(desired.keys), reading(desired.keys)
    refusal = change.refusal()
    if refusal:
        # Keep what `all` resolved to for clients absent from this reading, and the last good size.
        cursor.all_lists = {**resolved_before, **{c: cursor.all_lists[c] for c in desired.refreshed}}
        cursor.held_since = cursor.held_since or now
        held = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(cursor.held_since))
        message = (
            f"the client registry {registry.path} was held (since {held}); no partition changed: {refusal}. "
            + CONFIRM_HINT
        )
        context.log.error(message)
        return SensorResult(skip_reason=SkipReason(message), cursor=cursor.dump())
    cursor.size, cursor.held_since = change.size, None
    new = sorted(set(desired.keys) - existing)[:MAX_NEW_PER_TICK]
    gone = every_gone[:MAX_DELETED_PER_TICK] if settled else []
    waiting = (
        f"{len(every_gone)} partitions to delete wait for the next tick to read the same registry"
        if every_gone and not settled
        else ""
    )
    run_requests = []
    for key in new:
        run_requests.append(
            RunRequest(
                partition_key=key,
                run_key=f"initial:{key}",  # once per partition, even if a tick is evaluated twice
                run_config=sync_run_config(full_refresh=True),
                tags=run_tags(desired.keys[key], "initial"),
            )
        )
    requests_: list[AddDynamicPartitionsRequest | DeleteDynamicPartitionsRequest] = []
    if new:
        requests_.append(mailchimp_lists.build_add_request(new))
    if gone:
        requests_.append(mailchimp_lists.build_delete_request(gone))
    pending = len(set(desired.keys) - existing) - len(new)
    context.log.info(
        f"{len(desired.keys)} lists in the registry, {len(existing)} partitions: +{len(new)} -{len(gone)}"
        + (f" ({len(change.confirmed)} named under `removed`)" if change.confirmed else "")
        + (f" ({pending} more next ticks)" if pending else "")
        + (f"; re-read `all` for {desired.refreshed}" if desired.refreshed else "")
        + (f"; {waiting}" if waiting else "")
    )
    if not new and not gone:
        reason = waiting or "the partitions match the registry"
        return SensorResult(skip_reason=SkipReason(reason), cursor=cursor.dump())
    return SensorResult(run_requests=run_requests, dynamic_partitions_requests=requests_, cursor=cursor.dump())


def _client_of(key: str) -> str:
    try:
        return parse_partition_key(key)[0]
    except ValueError:
        return ""


# --------------------------------------------------------------------------- failures
@dataclass(frozen=True)
class FailureReport:
    partition: str
    client: str
    list_id: str
    cause: str
    run_id: str
    job: str
    retryable: bool

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def failure_report(context: RunFailureSensorContext) -> FailureReport:
    run = context.dagster_run
    partition = run.tags.get("dagster/partition", "")
    client, list_id = ("", "")
    if partition:
        with contextlib.suppress(ValueError):
            client, list_id = parse_partition_key(partition)
    cause = ""
    retryable = True
    for event in context.get_step_failure_events():
        data = event.step_failure_data
        if data.user_failure_data is not None:
            cause = data.user_failure_data.description or ""
            md = data.user_failure_data.metadata or {}
            if "retryable" in md:
                retryable = bool(md["retryable"].value)
        if not cause and data.error is not None:
            cause = data.error.message.strip().splitlines()[-1] if data.error.message.strip() else ""
        if cause:
            break
    if not cause:
        cause = context.failure_event.message or "the run failed"
    return FailureReport(partition, client, list_id, cause[:2000], run.run_id, run.job_name, retryable)


def post_webhook(url: str, report: FailureReport) -> None:
    payload = {
        "text": f"mc-pipeline: sync of {report.partition or report.job} failed: {report.cause}",
        **report.as_dict(),
    }
    try:
        requests.post(url, json=payload, timeout=5).raise_for_status()
    except requests.RequestException as exc:
        log.warning(f"alert webhook failed ({type(exc).__name__}); the failure is recorded in Dagster anyway")


@run_failure_sensor(
    name="sync_failure_alerts",
    default_status=DefaultSensorStatus.RUNNING,
    description="Records each failed sync on its partition of ometria/contacts and posts to the alert webhook.",
)
def sync_failure_alerts(context: RunFailureSensorContext) -> None:
    if context.dagster_run.status != DagsterRunStatus.FAILURE:
        return
    report = failure_report(context)
    context.log.error(
        f"sync failed: partition {report.partition or '-'} (client {report.client or '-'}, "
        f"list {report.list_id or '-'}), run {report.run_id}: {report.cause}"
    )
    if report.partition:
        context.instance.report_runless_asset_event(
            AssetObservation(
                asset_key=CONTACTS_KEY,
                partition=report.partition,
                metadata={
                    "sync_failed": True,
                    "client": report.client,
                    "list": report.list_id,
                    "cause": report.cause,
                    "run_id": report.run_id,
                    "retryable": report.retryable,
                },
            )
        )
    url = os.environ.get("MC_PIPELINE_ALERT_WEBHOOK")
    if url:
        post_webhook(url, report)
