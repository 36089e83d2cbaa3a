"""`counts_reconcile`: the per-partition check that no step of a sync lost or invented a record."""

import warnings

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetRecordsFilter,
    DagsterInstance,
    asset_check,
)
from dagster._utils.warnings import PreviewWarning

from mc_pipeline.assets.mailchimp import CONTACTS_KEY, MEMBERS_KEY, PAGES_KEY
from mc_pipeline.partitions import mailchimp_lists


def _latest_metadata(instance: DagsterInstance, key, partition: str) -> tuple[str | None, dict]:
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1)
    for record in records.records:
        mat = record.asset_materialization
        return record.run_id, {k: v.value for k, v in (mat.metadata if mat else {}).items()}
    return None, {}


with warnings.catch_warnings():
    # Partitioned asset checks are a preview feature of Dagster 1.13; the check needs the
    # partition (one verdict per client list), and its result shows on the partition in the UI.
    warnings.simplefilter("ignore", PreviewWarning)

    @asset_check(
        asset=CONTACTS_KEY,
        name="counts_reconcile",
        partitions_def=mailchimp_lists,
        blocking=False,
        description="Mailchimp's total for the window = rows staged = contacts + dead letters = accepted + rejected.",
    )
    def counts_reconcile(context: AssetCheckExecutionContext) -> AssetCheckResult:
        """Drift between the steps of one sync is a lost or invented record: the check names the counts.

        While a list changes during a sync, members leave the window, so Mailchimp's total is a
        range (at the first page, and the smallest any page saw) rather than a number.
        """
        partition = context.partition_key
        instance = context.instance
        run_pages, pages = _latest_metadata(instance, PAGES_KEY, partition)
        run_members, members = _latest_metadata(instance, MEMBERS_KEY, partition)
        run_contacts, contacts = _latest_metadata(instance, CONTACTS_KEY, partition)
        if not (run_pages and run_pages == run_members == run_contacts):
            return AssetCheckResult(
                passed=False,
                severity=AssetCheckSeverity.WARN,
                description="the three assets of this partition were not all materialized by one run",
                metadata={
                    "pages_run": run_pages or "",
                    "members_run": run_members or "",
                    "contacts_run": run_contacts or "",
                },
            )
        archived = pages.get("archived_members", 0)
        low = pages["total_items_at_end"] + archived
        high = pages["total_items"] + archived
        staged = members["dagster/row_count"]
        staging_dead = members.get("dead_letters", 0)
        records = contacts["records"]
        dead = contacts["dead_letters"]  # staging + transform + import
        import_dead = contacts["rejected"]
        problems = []
        if not low <= staged + staging_dead <= high:
            problems.append(
                f"Mailchimp listed {low}..{high} members, {staged + staging_dead} were staged or dead-lettered"
            )
        if staged != records + (dead - staging_dead - import_dead):
            problems.append(f"{staged} rows staged but {records} contacts + {dead - staging_dead - import_dead} dead")
        if records != contacts["accepted"] + import_dead:
            problems.append(f"{records} contacts but {contacts['accepted']} accepted + {import_dead} rejected")
        return AssetCheckResult(
            passed=not problems,
            description="; ".join(problems) or None,
            metadata={
                "mailchimp_total_first": pages["total_items"],
                "mailchimp_total_last": pages["total_items_at_end"],
                "archived": archived,
                "staged": staged,
                "contacts": records,
                "accepted": contacts["accepted"],
                "dead_letters": dead,
            },
        )
