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
    MetadataValue,
    asset_check,
)
from dagster._utils.warnings import PreviewWarning

from mc_pipeline.assets.keys import CONTACTS_KEY
from mc_pipeline.assets.watermarks import latest_events, latest_observation_after
from mc_pipeline.dead_letters import CHECK_NAME, OUTSTANDING
from mc_pipeline.partitions import MAILCHIMP_LISTS, mailchimp_lists

STALE_AFTER_S = 2 * 3600


def last_imports(instance: DagsterInstance) -> dict[str, float]:
    """Each partition's last successful import or later verification (a probe found nothing to
    import: automation/probes.py), in a few queries whatever the number of lists."""
    out: dict[str, float] = {}
    for partition, (imported, verified) in latest_events(instance).items():
        out[partition] = max(imported.timestamp, verified.timestamp if verified else 0.0)
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
    description="Fails, naming them, when any client list was neither imported nor verified unchanged in two hours.",
)
def contacts_freshness(context: AssetCheckExecutionContext) -> AssetCheckResult:
    now = time.time()
    stale = stale_partitions(context.instance, now)
    total = len(context.instance.get_dynamic_partitions(MAILCHIMP_LISTS))
    lines = ["| partition | last import or verification (UTC) | hours ago |", "|---|---|---|"]
    for key, ts, hours in stale[:200]:
        when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts else "never"
        lines.append(f"| {key} | {when} | {'' if hours is None else f'{hours:.1f}'} |")
    return AssetCheckResult(
        passed=not stale,
        severity=AssetCheckSeverity.WARN,
        description=f"{len(stale)} of {total} lists neither imported nor verified in 2 hours" if stale else None,
        metadata={
            "lists": total,
            "stale_lists": len(stale),
            "never_imported": sum(1 for _, ts, _ in stale if ts is None),
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
