"""Run tags: who a run is for, and the accounts whose limits it shares with other runs.

The run queue limits concurrent runs per unique value of `dagster/partition` and of the two
account tags (dagster.yaml), so one list never syncs twice at once and the lists of one account
never sync at once from two processes. Runs that bypass the queue (the CLI executes in process)
or lack the account tags (the asset graph's implicit job) are held by the run itself
(mc_pipeline/run_guard.py), which reads the same tags, or the registry when they are missing.
"""

from __future__ import annotations

from collections.abc import Mapping

from mc_pipeline.registry import Client

MAILCHIMP_ACCOUNT = "mc_pipeline/mailchimp_account"
OMETRIA_ACCOUNT = "mc_pipeline/ometria_account"
SYNC_KIND = "mc_pipeline/sync"  # "initial", "incremental", "full_refresh"
LIST_NAME = "mc_pipeline/list_name"  # Mailchimp's name of the list, set as the run starts (a key is two ids)
PARTITION = "dagster/partition"  # Dagster's own: on every run of a partition, however launched
# One run in progress per value of each. Tag limits, not pools: a pool limits ops, and these hold a whole
# run (the three assets and the account's rate) per list and per account, whatever launched it.
LIMITED_TAGS = (PARTITION, MAILCHIMP_ACCOUNT, OMETRIA_ACCOUNT)
# Where a sync's process runs, set as it starts (run_guard.py), so a run killed outright (SIGKILL, OOM)
# is known gone, not waited for. Bookkeeping nobody filters by: Dagster's hidden-tag prefix keeps them
# out of the UI's tag chips (Dagster's own run-worker and gRPC tags use it for the same reason).
RUN_HOST = ".dagster/mc_pipeline_host"
RUN_PID = ".dagster/mc_pipeline_pid"


def account_tags(client: Client) -> dict[str, str]:
    """The two accounts a client's runs use: the registry's `account:`, else the client id."""
    return {
        MAILCHIMP_ACCOUNT: client.mailchimp.account or client.id,
        OMETRIA_ACCOUNT: client.ometria.account or client.id,
    }


def run_tags(client: Client, kind: str) -> dict[str, str]:
    """A requested run's tags. No client or list tag: `dagster/partition` (`client:list`) names both,
    and an operator filters by it; the name of the list comes as the run starts (`started_tags`)."""
    return {**account_tags(client), SYNC_KIND: kind}


def started_tags(tags: Mapping[str, str], full_refresh: bool, incremental: bool, list_name: str) -> dict[str, str]:
    """What a run adds as it starts: the list's name, and its sync kind when its launcher set none
    (a backfill or the launchpad: Dagster's partition tags override a request's, so `partition_tags`
    cannot carry a kind without erasing the sensor's "initial"), named as the sensor and schedules
    name theirs: a full refresh asked for, an incremental window, else the list's initial (full) sync."""
    added = {LIST_NAME: list_name} if list_name and tags.get(LIST_NAME) != list_name else {}
    if not tags.get(SYNC_KIND):
        added[SYNC_KIND] = "full_refresh" if full_refresh else "incremental" if incremental else "initial"
    return added


def limited_values(tags: Mapping[str, str]) -> set[tuple[str, str]]:
    """The (tag, value) pairs of `LIMITED_TAGS` a run holds: two runs sharing one must not overlap."""
    return {(key, tags[key]) for key in LIMITED_TAGS if tags.get(key)}
