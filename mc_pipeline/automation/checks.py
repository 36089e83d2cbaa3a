"""Asset checks on `ometria/contacts`: a list not synced for over two hours, or holding too many
outstanding dead letters, stands out in the UI."""

import time
import warnings
from datetime import UTC, datetime
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    MetadataValue,
    asset_check,
)
from dagster._utils.warnings import PreviewWarning

from mc_pipeline.assets.mailchimp import CONTACTS_KEY
from mc_pipeline.dead_letters import CHECK_NAME, OUTSTANDING
from mc_pipeline.partitions import MAILCHIMP_LISTS, mailchimp_lists

STALE_AFTER_S = 2 * 3600


def last_imports(instance: DagsterInstance) -> dict[str, float]:
    """Each partition's last successful import time, in two queries whatever the number of lists."""
    latest = instance.get_latest_storage_id_by_partition(CONTACTS_KEY, DagsterEventType.ASSET_MATERIALIZATION)
    if not latest:
        return {}
    ids = list(latest.values())
    out: dict[str, float] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=CONTACTS_KEY, storage_ids=chunk), limit=len(chunk)
        )
        for record in result.records:
            if record.partition_key is not None:
                out[record.partition_key] = record.timestamp
    return out


def stale_partitions(instance: DagsterInstance, now: float, stale_after_s: float = STALE_AFTER_S) -> list[tuple]:
    """(partition, last import or None, hours since) for every partition staler than the bound."""
    last = last_imports(instance)
    rows = []
    for key in instance.get_dynamic_partitions(MAILCHIMP_LISTS):
        ts = last.get(key)
        if ts is None or now - ts > stale_after_s:
            rows.append((key, ts, None if ts is None else (now - ts) / 3600))
    return sorted(rows, key=lambda r: (r[1] is not None, r[1] or 0))


@asset_check(
    asset=CONTACTS_KEY,
    name="synced_within_two_hours",
    blocking=False,
    description="Fails, naming them, when any client list's last successful import is over two hours old.",
)
def contacts_freshness(context: AssetCheckExecutionContext) -> AssetCheckResult:
    now = time.time()
    stale = stale_partitions(context.instance, now)
    total = len(context.instance.get_dynamic_partitions(MAILCHIMP_LISTS))
    lines = ["| partition | last import (UTC) | hours ago |", "|---|---|---|"]
    for key, ts, hours in stale[:200]:
        when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts else "never"
        lines.append(f"| {key} | {when} | {'' if hours is None else f'{hours:.1f}'} |")
    return AssetCheckResult(
        passed=not stale,
        severity=AssetCheckSeverity.WARN,
        description=f"{len(stale)} of {total} lists not imported in the last 2 hours" if stale else None,
        metadata={
            "lists": total,
            "stale_lists": len(stale),
            "never_imported": sum(1 for _, ts, _ in stale if ts is None),
            "stale": MetadataValue.md("\n".join(lines) if stale else "_none_"),
        },
    )


def dead_letter_state(instance: DagsterInstance, partition: str) -> dict[str, Any] | None:
    """The list's outstanding dead letters as last recorded: by its latest import, or by a later
    replay (an observation of `ometria/contacts`), whichever is newer."""
    where = AssetRecordsFilter(asset_key=CONTACTS_KEY, asset_partitions=[partition])
    found: list[tuple[int, dict[str, Any]]] = []
    for record in instance.fetch_materializations(where, limit=1).records:
        md = record.asset_materialization.metadata if record.asset_materialization else {}
        found.append((record.storage_id, {k: v.value for k, v in md.items()}))
    for record in instance.fetch_observations(where, limit=20).records:
        md = record.asset_observation.metadata if record.asset_observation else {}
        if OUTSTANDING in md:
            found.append((record.storage_id, {k: v.value for k, v in md.items()}))
            break
    newest = max(found, key=lambda f: f[0], default=None)
    return newest[1] if newest and OUTSTANDING in newest[1] else None


with warnings.catch_warnings():
    warnings.simplefilter("ignore", PreviewWarning)  # partitioned asset checks: a preview in Dagster 1.13

    @asset_check(
        asset=CONTACTS_KEY,
        name=CHECK_NAME,
        partitions_def=mailchimp_lists,
        blocking=False,
        description="Fails, naming them, when a list's outstanding dead letters pass a share of the list.",
    )
    def dead_letters_within_share(context: AssetCheckExecutionContext) -> AssetCheckResult:
        """Judged per list, across runs, not per run: a run's window may be mostly bad members, and
        holding its watermark back would fetch them again forever. Replay clears them."""
        state = dead_letter_state(context.instance, context.partition_key)
        if state is None:
            return AssetCheckResult(passed=True, description="no import recorded outstanding dead letters yet")
        share, limit = float(state["outstanding_share"]), float(state["dead_letter_share_limit"])
        return AssetCheckResult(
            passed=share <= limit,
            severity=AssetCheckSeverity.ERROR,
            description=state.get("dead_letter_alert") or None,
            metadata={
                OUTSTANDING: int(state[OUTSTANDING]),
                "outstanding_share": share,
                "list_members": int(state["list_members"]),
                "dead_letter_share_limit": limit,
                "outstanding_named": MetadataValue.md(str(state.get("outstanding_named") or "_none_")),
            },
        )
