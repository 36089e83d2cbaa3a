"""`counts_reconcile`: the per-partition check that no step of a sync lost or invented a record.

Every row Mailchimp sent is accounted for, step by step, from the three assets' metadata:
  rows fetched = rows staging read (members staged + overlap duplicates + older versions + dead letters)
  Mailchimp's totals (members + archived) = members staged + staging dead letters   (a static list: exact)
  members staged = contacts + transform dead letters;  contacts = unchanged skipped + accepted + rejected
The pages overlap, so rows are not members: a duplicate with the same last_changed is the overlap,
expected; one with another last_changed is a member that changed during the sync. When a count
does not add up, the run's files name the members that went missing.
"""

import gzip
import warnings
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    MetadataValue,
    asset_check,
)
from dagster._utils.warnings import PreviewWarning

from mc_pipeline.assets.keys import CONTACTS_KEY, MEMBERS_KEY, PAGES_KEY
from mc_pipeline.partitions import mailchimp_lists
from mc_pipeline.storage import RunFolder

NAMED = 20  # missing members named in the description; the metadata lists up to 1,000


def _latest_metadata(instance: DagsterInstance, key: AssetKey, partition: str) -> tuple[str | None, dict[str, Any]]:
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1)
    for record in records.records:
        mat = record.asset_materialization
        return record.run_id, {k: v.value for k, v in (mat.metadata if mat else {}).items()}
    return None, {}


def reconcile(pages: dict[str, Any], members: dict[str, Any], contacts: dict[str, Any]) -> dict[str, str]:
    """{step: what does not add up} from the three assets' metadata; empty when every count reconciles."""
    return {**_listing_problems(pages, members), **_push_problems(members, contacts)}


def _listing_problems(pages: dict[str, Any], members: dict[str, Any]) -> dict[str, str]:
    """Mailchimp's pages -> staged members: every row fetched is staged, a duplicate or a dead letter."""
    total, total_end = pages["total_items"], pages["total_items_at_end"]
    a_total, a_total_end = pages.get("archived_total_items", 0), pages.get("archived_total_items_at_end", 0)
    staged, staging_dead = members["dagster/row_count"], members.get("dead_letters", 0)
    overlap_dups, changed_dups = members.get("overlap_duplicates", 0), members.get("changed_duplicates", 0)
    static = (
        total == total_end
        and a_total == a_total_end
        and pages.get("passes", 1) == 1
        and pages.get("archived_passes", 1) <= 1
        and changed_dups == 0
    )
    problems: dict[str, str] = {}
    for name, read, low, high in (
        ("members", pages["members"], total_end, total),
        ("archived members", pages.get("archived_members", 0), a_total_end, a_total),
    ):
        if not low <= read <= high:
            problems[f"fetch {name}"] = f"Mailchimp counted {low}..{high} {name} in the window, the pages held {read}"
    if not pages["rows_fetched"] == members["rows_read"] == staged + overlap_dups + changed_dups + staging_dead:
        problems["staging"] = (
            f"{pages['rows_fetched']} rows fetched but {members['rows_read']} read by staging, {staged} staged, "
            f"{overlap_dups + changed_dups} duplicates and {staging_dead} dead letters"
        )
    listed = staged + staging_dead
    if static and (listed != total + a_total or overlap_dups != pages["overlap_rows"]):
        problems["members"] = (
            f"Mailchimp listed {total} members and {a_total} archived, {listed} were staged or dead-lettered "
            f"({overlap_dups} of the {pages['overlap_rows']} overlapping rows were the same member)"
        )
    elif not static and listed < total_end + a_total_end - changed_dups:
        problems["members"] = (
            f"Mailchimp listed at least {total_end} members and {a_total_end} archived, {listed} were staged or "
            "dead-lettered"
        )
    return problems


def _push_problems(members: dict[str, Any], contacts: dict[str, Any]) -> dict[str, str]:
    """Staged members -> contacts -> Ometria's answers."""
    staged, staging_dead = members["dagster/row_count"], members.get("dead_letters", 0)
    problems: dict[str, str] = {}
    records, dead, rejected = contacts["records"], contacts["dead_letters"], contacts["rejected"]
    transform_dead = dead - staging_dead - rejected
    if staged != records + transform_dead:
        problems["transform"] = f"{staged} members staged but {records} contacts + {transform_dead} dead letters"
    skipped = contacts.get("unchanged_skipped", 0)
    if records != skipped + contacts["accepted"] + rejected:
        problems["import"] = (
            f"{records} contacts but {skipped} unchanged skipped + {contacts['accepted']} accepted + "
            f"{rejected} rejected"
        )
    return problems


def _ids(path: Path, column: str) -> set[str]:
    if not path.exists():
        return set()
    return {x for x in pq.read_table(path, columns=[column]).column(column).to_pylist() if x}


def missing_members(folder: RunFolder, steps: set[str]) -> list[str]:
    """Member ids that one step had and the next neither kept nor dead-lettered, read from the run's files."""
    staged = _ids(folder.members, "member_id")
    dead = set().union(*(_ids(p, "member_id") for p in folder.root.glob("dead_letters-*.parquet")))
    missing: set[str] = set()
    if steps & {"staging", "members"}:
        fetched: set[str] = set()
        for path in folder.pages.glob("*.json.gz"):
            for m in orjson.loads(gzip.decompress(path.read_bytes())).get("members") or []:
                if isinstance(m, dict) and isinstance(m.get("id"), str):
                    fetched.add(m["id"])
        missing |= fetched - staged - dead
    if "transform" in steps:
        missing |= staged - _ids(folder.contacts, "member_id") - dead
    return sorted(missing)


with warnings.catch_warnings():
    # Partitioned asset checks are a preview feature of Dagster 1.13; the check needs the
    # partition (one verdict per client list), and its result shows on the partition in the UI.
    warnings.simplefilter("ignore", PreviewWarning)

    @asset_check(
        asset=CONTACTS_KEY,
        name="counts_reconcile",
        partitions_def=mailchimp_lists,
        blocking=False,
        description="Every row Mailchimp sent is a staged member, an overlap duplicate, an older version or a dead "
        "letter; staged members = Mailchimp's totals (exact on a static list) = contacts + dead letters = accepted "
        "+ rejected + unchanged skipped.",
    )
    def counts_reconcile(context: AssetCheckExecutionContext) -> AssetCheckResult:
        """A count that does not add up is a lost or invented record: the check says which step, and
        names the members missing. A list changing during the sync is not one: Mailchimp's total is
        then a range (at the first page, and the smallest any page saw)."""
        partition = context.partition_key
        instance = context.instance
        run_pages, pages = _latest_metadata(instance, PAGES_KEY, partition)
        run_members, members = _latest_metadata(instance, MEMBERS_KEY, partition)
        run_contacts, contacts = _latest_metadata(instance, CONTACTS_KEY, partition)
        if not (run_pages and run_pages == run_members == run_contacts):
            return _not_one_run(run_pages, run_members, run_contacts)
        problems = reconcile(pages, members, contacts)
        folder = contacts.get("run_folder")
        missing = missing_members(RunFolder(Path(folder)), set(problems)) if problems and folder else []
        name = str(contacts.get("list_name") or "")
        description = f"{name}: " * bool(problems and name) + _describe(problems, missing)
        return AssetCheckResult(
            passed=not problems,
            description=description or None,
            metadata={
                "list_name": name,
                "mailchimp_total_first": pages["total_items"],
                "mailchimp_total_last": pages["total_items_at_end"],
                "archived": pages.get("archived_total_items", 0),
                "rows_fetched": pages["rows_fetched"],
                "overlap_rows": pages["overlap_rows"],
                "overlap_duplicates": members.get("overlap_duplicates", 0),
                "changed_duplicates": members.get("changed_duplicates", 0),
                "staged": members["dagster/row_count"],
                "contacts": contacts["records"],
                "unchanged_skipped": contacts.get("unchanged_skipped", 0),
                "accepted": contacts["accepted"],
                "dead_letters": contacts["dead_letters"],
                "missing_members": MetadataValue.json(missing[:1000]),
            },
        )


def _not_one_run(run_pages: str | None, run_members: str | None, run_contacts: str | None) -> AssetCheckResult:
    """A warning, not a verdict: the counts of different runs cannot be compared."""
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


def _describe(problems: dict[str, str], missing: list[str]) -> str:
    description = "; ".join(problems.values())
    if missing:
        more = f" and {len(missing) - NAMED} more" if len(missing) > NAMED else ""
        description += f"; missing members: {', '.join(missing[:NAMED])}{more}"
    return description
