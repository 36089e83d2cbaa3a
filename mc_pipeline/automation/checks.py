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
    DagsterInstance,
    EventLogRecord,
    MetadataValue,
    asset_check,
)
from dagster._utils.warnings import PreviewWarning

from mc_pipeline.assets.keys import CONTACTS_KEY
from mc_pipeline.assets.watermarks import latest_events, latest_observation_after
from mc_pipeline.dead_letters import CHECK_NAME, OUTSTANDING
from mc_pipeline.partitions import MAILCHIMP_LISTS, mailchimp_lists

STALE_AFTER_S = 2 * 3600


def _last(imported: EventLogRecord, verified: EventLogRecord | None) -> float:
    return max(imported.timestamp, verified.timestamp if verified else 0.0)


def last_imports(instance: DagsterInstance) -> dict[str, float]:
    """Each partition's last successful import or later verification (a probe found nothing to
    import: automation/probes.py), in a few queries whatever the number of lists."""
    return {partition: _last(*events) for partition, events in latest_events(instance).items()}


def list_name(record: EventLogRecord | None) -> str:
    """The list's name as its import recorded it (`mailchimp/member_pages` asks Mailchimp)."""
    mat = record.asset_materialization if record is not None else None
    value = mat.metadata.get("list_name") if mat is not None else None
    return str(value.value) if value is not None else ""


def stale_partitions(instance: DagsterInstance, now: float, stale_after_s: float = STALE_AFTER_S) -> list[tuple]:
    """(partition, list name, last import or None, hours since) for every partition staler than the bound."""
    events = latest_events(instance)
    rows = []
    for key in instance.get_dynamic_partitions(MAILCHIMP_LISTS):
        imported, verified = events.get(key, (None, None))
        ts = _last(imported, verified) if imported is not None else None
        if ts is None or now - ts > stale_after_s:
            rows.append((key, list_name(imported), ts, None if ts is None else (now - ts) / 3600))
    return sorted(rows, key=lambda r: (r[2] is not None, r[2] or 0))


# A check, not a FreshnessPolicy: a policy judges the asset as a whole (or each time partition), and
# this judges every dynamic partition, each list, counting a probe's verification as fresh too.
@asset_check(
    asset=CONTACTS_KEY,
    name="synced_within_two_hours",
    blocking=False,
    description="Fails, naming them, when any client list was neither imported nor verified unchanged in two hours.",
)
def contacts_freshness(context: AssetCheckExecutionContext) -> AssetCheckResult:
    now = time.time()
    stale = stale_partitions(context.instance, now)
    total = len(context.instance.get_dynamic_partitions(MAILCHIMP_LISTS))
    lines = ["| partition | list | last import or verification (UTC) | hours ago |", "|---|---|---|---|"]
    for key, name, ts, hours in stale[:200]:
        when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts else "never"
        lines.append(f"| {key} | {name.replace('|', '/')} | {when} | {'' if hours is None else f'{hours:.1f}'} |")
    return AssetCheckResult(
        passed=not stale,
        severity=AssetCheckSeverity.WARN,
        description=f"{len(stale)} of {total} lists neither imported nor verified in 2 hours" if stale else None,
        metadata={
            "lists": total,
            "stale_lists": len(stale),
            "never_imported": sum(1 for row in stale if row[2] is None),
            "stale": MetadataValue.md("\n".join(lines) if stale else "_none_"),
        },
    )


def dead_letter_state(instance: DagsterInstance, partition: str) -> dict[str, Any] | None:
    """The list's outstanding dead letters as last recorded: by its latest import, or by a later
    replay (an observation of `ometria/contacts`), whichever is newer. Observations after the
    import are paged through: hourly verifications (automation/probes.py) are observations too."""
    where = AssetRecordsFilter(asset_key=CONTACTS_KEY, asset_partitions=[partition])
    state: dict[str, Any] | None = None
    imported_id = None
    for record in instance.fetch_materializations(where, limit=1).records:
        md = record.asset_materialization.metadata if record.asset_materialization else {}
        state, imported_id = {k: v.value for k, v in md.items()}, record.storage_id
    replay = latest_observation_after(instance, partition, imported_id, lambda md: OUTSTANDING in md)
    if replay is not None and replay.asset_observation is not None:
        return {k: v.value for k, v in replay.asset_observation.metadata.items()}
    return state if state and OUTSTANDING in state else None


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
        name, alert = str(state.get("list_name") or ""), state.get("dead_letter_alert")
        return AssetCheckResult(
            passed=share <= limit,
            severity=AssetCheckSeverity.ERROR,
            description=(f"{name}: {alert}" if name else alert) if alert else None,
            metadata={
                "list_name": name,
                OUTSTANDING: int(state[OUTSTANDING]),
                "outstanding_share": share,
                "list_members": int(state["list_members"]),
                "dead_letter_share_limit": limit,
                "outstanding_named": MetadataValue.md(str(state.get("outstanding_named") or "_none_")),
            },
        )
