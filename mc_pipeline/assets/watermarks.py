"""Watermarks: where the next incremental window starts, and the destination each belongs to.

`ometria/contacts` records, with each successful import, the upper bounds of its windows and
the destination the contacts went to (Ometria base URL, account, collection, a fingerprint of
the key). A watermark says "everything changed before this is in that destination": for any
other destination it says nothing, so a changed collection prefix, account, key or URL starts
with a full sync instead of leaving the new collection empty behind green runs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NamedTuple

from dagster import AssetExecutionContext, AssetKey, AssetRecordsFilter, DagsterInstance, Failure, MetadataValue

from mc_pipeline.assets.models import Destination, RunFiles, Window
from mc_pipeline.registry import Client, RegistryError, SecretError, YamlClientRegistry
from mc_pipeline.resources.limits import fingerprint
from mc_pipeline.resources.ometria import DEFAULT_BASE_URL
from mc_pipeline.run_guard import run_limits, wait_for_turn
from mc_pipeline.tags import OMETRIA_ACCOUNT, account_tags, limited_values

CONTACTS_KEY = AssetKey(["ometria", "contacts"])
WATERMARK = "watermark"
ARCHIVED_WATERMARK = "archived_watermark"
DESTINATION = "destination"  # JSON: base_url, account, collection, key (fingerprint)
DESTINATION_ID = "destination_id"


class Watermarks(NamedTuple):
    since: datetime | None
    archived_since: datetime | None
    why_full: str | None  # why there is none to start from, for the run's log


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


def _timestamp(md: dict[str, Any], name: str) -> datetime | None:
    value = md.get(name)
    return datetime.fromtimestamp(float(value.value), UTC) if value is not None else None


def latest_watermarks(instance: DagsterInstance, partition: str, destination: Destination | None = None) -> Watermarks:
    """The bounds of this partition's latest successful import, if it went to `destination`
    (any destination when None). Only the latest counts: after a move away and back, the old
    destination missed what changed meanwhile, so it starts over too."""
    result = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=CONTACTS_KEY, asset_partitions=[partition]), limit=1
    )
    for record in result.records:
        md = dict(record.asset_materialization.metadata) if record.asset_materialization else {}
        if destination is not None:
            recorded = md.get(DESTINATION_ID)
            if recorded is None:
                return Watermarks(None, None, "the last import recorded no destination (it predates destinations)")
            if recorded.value != destination.id:
                was = md.get(DESTINATION)
                return Watermarks(
                    None, None, f"the destination changed since the last import (was {was.value if was else '?'})"
                )
        return Watermarks(_timestamp(md, WATERMARK), _timestamp(md, ARCHIVED_WATERMARK), None)
    return Watermarks(None, None, "never imported")


def latest_watermark(instance: DagsterInstance, partition: str) -> datetime | None:
    return latest_watermarks(instance, partition).since


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
