"""Watermarks: where the next incremental window starts, and the destination each belongs to.

`ometria/contacts` records, with each successful import, the upper bounds of its windows and
the destination the contacts went to (Ometria base URL, account, collection, a fingerprint of
the key). A watermark says "everything changed before this is in that destination": for any
other destination it says nothing, so a changed collection prefix, account, key or URL starts
with a full sync instead of leaving the new collection empty behind green runs.

A list that did not change is not run: the schedule's probe (automation/probes.py) records an
observation of `ometria/contacts` with the same keys and `verified_at`, and the next window
starts from the newest of the import and the verifications after it (README, "Change-aware").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

from dagster import (
    AssetExecutionContext,
    AssetMaterialization,
    AssetObservation,
    AssetRecordsFilter,
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    EventLogEntry,
    EventLogRecord,
    Failure,
    MetadataValue,
)
from dagster._core.events import AssetObservationData, StepMaterializationData
from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID

from mc_pipeline.assets.keys import CONTACTS_KEY, PAGES_KEY
from mc_pipeline.assets.models import Destination, RunFiles, Window
from mc_pipeline.registry import Client, RegistryError, SecretError, YamlClientRegistry
from mc_pipeline.resources.limits import fingerprint
from mc_pipeline.resources.ometria import DEFAULT_BASE_URL
from mc_pipeline.run_guard import run_limits, wait_for_turn
from mc_pipeline.tags import OMETRIA_ACCOUNT, account_tags, limited_values

WATERMARK = "watermark"
ARCHIVED_WATERMARK = "archived_watermark"
DESTINATION = "destination"  # JSON: base_url, account, collection, key (fingerprint)
DESTINATION_ID = "destination_id"
VERIFIED_AT = "verified_at"  # on an observation: a probe found the window since the watermark empty
LIST_NAME = "list_name"  # on mailchimp/member_pages: Mailchimp's name of the list
LIST_MEMBERS = "list_members"  # on mailchimp/member_pages: the list's members at its last full sync


class ListHistory(NamedTuple):
    """What the last sync learnt of the list itself (`list_history`)."""

    name: str | None
    members: int | None  # at the last full sync, carried by the incremental ones since


class Watermarks(NamedTuple):
    since: datetime | None
    archived_since: datetime | None
    why_full: str | None  # why there is none to start from, for the run's log
    proved_at: float | None = None  # when the import or verification they come from was recorded (our clock)


def destination_of(client: Client, list_id: str) -> Destination:
    """The destination a client list's contacts go to now, per the registry."""
    try:
        key = client.ometria.api_key.resolve().get_secret_value().strip()
    except SecretError as exc:
        raise Failure(
            description=f"{client.id}:{list_id}: the Ometria key cannot be read: {exc}",
            metadata={"client": client.id, "list": list_id, "cause": "credentials", "retryable": False},
            allow_retries=False,
        ) from None
    return Destination(
        base_url=(client.ometria.base_url or DEFAULT_BASE_URL).rstrip("/"),
        account=account_tags(client)[OMETRIA_ACCOUNT],
        collection=client.collection(list_id),
        key=fingerprint(key),
    )


def begin_sync(
    context: AssetExecutionContext,
    client: Client,
    list_id: str,
    registry: YamlClientRegistry,
    full_refresh: bool,
    wait_s: float,
) -> tuple[Destination, Watermarks]:
    """Wait for the runs of this list or its accounts that started first (run_guard.py), then
    choose the window: from the watermark of the current destination, else from the beginning.
    Reading the watermark after the wait starts this run where the one it waited for ended."""
    partition = context.partition_key
    accounts: dict[str, dict[str, str]] = {}

    def accounts_of(client_id: str) -> dict[str, str]:
        if client_id not in accounts:
            try:
                accounts[client_id] = account_tags(registry.client(client_id))
            except (RegistryError, KeyError):
                accounts[client_id] = {}
        return accounts[client_id]

    # What this run holds: its partition, the accounts of its tags and those of the registry now.
    mine = run_limits(context.run.tags, accounts_of) | limited_values(account_tags(client))
    waited = wait_for_turn(
        context.instance,
        context.run.run_id,
        mine,
        accounts_of,
        context.log,
        what=partition,
        timeout_s=wait_s,
    )
    if waited >= 1:
        context.log.info(f"{partition}: waited {waited:.0f}s for the runs ahead of this one")
    destination = destination_of(client, list_id)
    if full_refresh:
        return destination, Watermarks(None, None, "a full refresh was asked for")
    marks = latest_watermarks(context.instance, partition, destination)
    if marks.why_full:
        context.log.info(f"{partition}: full sync into {destination.collection}: {marks.why_full}")
    return destination, marks


def list_history(instance: DagsterInstance, partition: str) -> ListHistory:
    """The list's name and size as the partition's latest `mailchimp/member_pages` recorded them: the
    size gives a full sync its page count before any answer (`MailchimpClient.fetch(size_hint=)`)."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=PAGES_KEY, asset_partitions=[partition]), limit=1
    ).records
    md = _metadata(records[0]) if records else {}
    name, members = _value(md, LIST_NAME), _value(md, LIST_MEMBERS)
    return ListHistory(str(name) if name else None, members if isinstance(members, int) else None)


def _timestamp(md: dict[str, Any], name: str) -> datetime | None:
    value = md.get(name)
    return datetime.fromtimestamp(float(value.value), UTC) if value is not None else None


def latest_watermarks(instance: DagsterInstance, partition: str, destination: Destination | None = None) -> Watermarks:
    """The bounds of this partition's latest successful import, if it went to `destination`
    (any destination when None), or of a later verification of the same destination (a probe
    found nothing changed since: automation/probes.py). Only the latest import counts: after a
    move away and back, the old destination missed what changed meanwhile, so it starts over too."""
    return watermarks_of(instance, {partition: destination})[partition]


def watermarks_of(instance: DagsterInstance, partitions: Mapping[str, Destination | None]) -> dict[str, Watermarks]:
    """`latest_watermarks` of many partitions in a few queries (a schedule tick reads hundreds)."""
    events = latest_events(instance, set(partitions))
    out: dict[str, Watermarks] = {}
    for partition, destination in partitions.items():
        if partition not in events:
            out[partition] = Watermarks(None, None, "never imported")
            continue
        imported, verified = events[partition]
        md = _metadata(imported)
        if destination is not None:
            recorded = md.get(DESTINATION_ID)
            if recorded is None:
                out[partition] = Watermarks(
                    None, None, "the last import recorded no destination (it predates destinations)"
                )
                continue
            if recorded.value != destination.id:
                was = md.get(DESTINATION)
                out[partition] = Watermarks(
                    None, None, f"the destination changed since the last import (was {was.value if was else '?'})"
                )
                continue
        latest = verified if verified is not None else imported
        md = _metadata(latest)
        out[partition] = Watermarks(
            _timestamp(md, WATERMARK), _timestamp(md, ARCHIVED_WATERMARK), None, latest.timestamp
        )
    return out


def latest_events(
    instance: DagsterInstance, partitions: set[str] | None = None
) -> dict[str, tuple[EventLogRecord, EventLogRecord | None]]:
    """Per partition (all when None): its latest import, and the latest verification of the same
    destination recorded after it (None if there is none): a few queries whatever the count."""
    imports = _latest_records(instance, DagsterEventType.ASSET_MATERIALIZATION, partitions)
    observed = _latest_records(instance, DagsterEventType.ASSET_OBSERVATION, partitions)
    out: dict[str, tuple[EventLogRecord, EventLogRecord | None]] = {}
    for partition, imported in imports.items():
        destination_id = _value(_metadata(imported), DESTINATION_ID)
        verified, latest = None, observed.get(partition)
        if latest is not None and latest.storage_id > imported.storage_id:
            # The latest observation may be something else (a dead-letter replay): look further back.
            verified = (
                latest
                if _verifies(_metadata(latest), destination_id)
                else latest_observation_after(
                    instance, partition, imported.storage_id, partial(_verifies, destination_id=destination_id)
                )
            )
        out[partition] = (imported, verified)
    return out


def _latest_records(
    instance: DagsterInstance, event_type: DagsterEventType, partitions: set[str] | None
) -> dict[str, EventLogRecord]:
    if partitions is not None and not partitions:
        return {}  # not a query over every partition for none
    by_partition = instance.get_latest_storage_id_by_partition(
        CONTACTS_KEY, event_type, partitions if partitions and len(partitions) <= 500 else None
    )
    ids = [i for p, i in by_partition.items() if partitions is None or p in partitions]
    fetch = (
        instance.fetch_materializations
        if event_type == DagsterEventType.ASSET_MATERIALIZATION
        else instance.fetch_observations
    )
    out: dict[str, EventLogRecord] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        for record in fetch(AssetRecordsFilter(asset_key=CONTACTS_KEY, storage_ids=chunk), limit=len(chunk)).records:
            if record.partition_key is not None:
                out[record.partition_key] = record
    return out


def latest_observation_after(
    instance: DagsterInstance, partition: str, after_storage_id: int | None, accept: Callable[[dict[str, Any]], bool]
) -> EventLogRecord | None:
    """The newest observation of the partition after `after_storage_id` whose metadata `accept`s."""
    where = AssetRecordsFilter(asset_key=CONTACTS_KEY, asset_partitions=[partition], after_storage_id=after_storage_id)
    cursor = None
    while True:
        result = instance.fetch_observations(where, limit=100, cursor=cursor)
        for record in result.records:  # newest first
            if accept(_metadata(record)):
                return record
        if not result.has_more:
            return None
        cursor = result.cursor


def _metadata(record: EventLogRecord) -> dict[str, Any]:
    event = record.asset_materialization or record.asset_observation
    return dict(event.metadata) if event is not None else {}


def _value(md: dict[str, Any], name: str) -> Any:
    return md[name].value if name in md else None


def _verifies(md: dict[str, Any], destination_id: str | None) -> bool:
    return VERIFIED_AT in md and _value(md, DESTINATION_ID) == destination_id


def verification_metadata(
    destination: Destination, verified_at: datetime, watermark: datetime, archived_watermark: datetime | None
) -> dict[str, Any]:
    """What a probe records on `ometria/contacts` when the window since the watermark is empty:
    the new watermarks (Mailchimp's clock) for the destination they hold for."""
    md: dict[str, Any] = {
        VERIFIED_AT: MetadataValue.timestamp(verified_at),
        WATERMARK: MetadataValue.timestamp(watermark),
        DESTINATION: MetadataValue.json(destination.model_dump()),
        DESTINATION_ID: MetadataValue.text(destination.id),
    }
    if archived_watermark is not None:
        md[ARCHIVED_WATERMARK] = MetadataValue.timestamp(archived_watermark)
    return md


def latest_watermark(instance: DagsterInstance, partition: str) -> datetime | None:
    return latest_watermarks(instance, partition).since


def record_import(instance: DagsterInstance, partition: str, watermark: datetime, destination: Destination) -> None:
    """What a successful full import records, without the run: a synced state for benchmarks and
    tests whose subject is the hour after (10,000 initial syncs would take hours on 2 cores)."""
    record_imports(instance, {partition: (watermark, destination)})


def record_imports(
    instance: DagsterInstance, imports: Mapping[str, tuple[datetime, Destination]], at: float | None = None
) -> None:
    """`record_import` of many partitions, written in batches (10,000 lists in seconds); `at`, when
    they are recorded as written (default now)."""
    events = []
    for partition, (watermark, destination) in imports.items():
        client_id, list_id = partition.split(":", 1)
        window = Window(since=None, before=watermark, full_refresh=True, archived_before=watermark)
        run = RunFiles(
            partition=partition,
            client_id=client_id,
            list_id=list_id,
            run_id="recorded",
            folder="",
            window=window,
            destination=destination,
        )
        events.append(
            AssetMaterialization(asset_key=CONTACTS_KEY, partition=partition, metadata=watermark_metadata(run))
        )
    for error in store_runless(instance, events, at=at):
        if error is not None:
            raise error


def store_runless(
    instance: DagsterInstance,
    events: Sequence[AssetMaterialization | AssetObservation],
    batch: int = 500,
    at: float | None = None,
) -> list[Exception | None]:
    """Runless asset events written `batch` at a time; per event, None or why it was not stored.

    `report_runless_asset_event` writes one event per call: on PostgreSQL two sessions and a few
    transactions each (Dagster's storages open a connection per operation). The event log's
    `store_event_batch`, what Dagster's own batched writer calls (DAGSTER_EVENT_BATCH_SIZE), writes
    a batch in one insert and one index transaction. A batch that fails is retried event by event.
    """
    entries = [
        EventLogEntry(
            user_message="",
            level=logging.INFO,
            job_name=RUNLESS_JOB_NAME,
            run_id=RUNLESS_RUN_ID,
            error_info=None,
            timestamp=at or time.time(),
            step_key=None,
            dagster_event=DagsterEvent(
                event_type_value=(
                    DagsterEventType.ASSET_MATERIALIZATION.value
                    if isinstance(e, AssetMaterialization)
                    else DagsterEventType.ASSET_OBSERVATION.value
                ),
                event_specific_data=(
                    StepMaterializationData(e) if isinstance(e, AssetMaterialization) else AssetObservationData(e)
                ),
                job_name=RUNLESS_JOB_NAME,
            ),
        )
        for e in events
    ]
    errors: list[Exception | None] = [None] * len(events)
    for start in range(0, len(entries), batch):
        chunk = entries[start : start + batch]
        try:
            # One event type per call: the PostgreSQL storage batches a single type only.
            if len({type(e) for e in events[start : start + batch]}) > 1:
                raise ValueError("mixed event types")
            instance.event_log_storage.store_event_batch(chunk)
        except Exception:
            for i in range(start, start + len(chunk)):
                try:
                    instance.report_runless_asset_event(events[i])
                except Exception as exc:
                    errors[i] = exc
    return errors


def watermark_metadata(run: RunFiles) -> dict[str, Any]:
    """What `ometria/contacts` records for the next run to start from."""
    md: dict[str, Any] = {WATERMARK: MetadataValue.timestamp(run.window.before), **_archived_watermark(run.window)}
    if run.destination is not None:
        md[DESTINATION] = MetadataValue.json(run.destination.model_dump())
        md[DESTINATION_ID] = MetadataValue.text(run.destination.id)
    return md


def _archived_watermark(window: Window) -> dict[str, Any]:
    """The archived sweep's bound moves only when it ran; otherwise the previous one carries over."""
    if window.archived_before is not None:
        return {ARCHIVED_WATERMARK: MetadataValue.timestamp(window.archived_before)}
    if window.archived_since is not None:
        return {ARCHIVED_WATERMARK: MetadataValue.timestamp(window.archived_since)}
    return {}


def known_until(window: Window) -> datetime:
    """The instant up to which a full fetch listed every member: the earlier of its two sweeps' bounds."""
    return min(window.before, window.archived_before) if window.archived_before else window.before
