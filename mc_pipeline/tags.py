"""Run tags: who a run is for, and the accounts whose limits it shares with other runs.

The run queue limits concurrent runs per unique value of the two account tags (dagster.yaml),
so the lists of one account never sync at once from two processes.
"""

from __future__ import annotations

from mc_pipeline.registry import Client

CLIENT = "mc_pipeline/client"
LIST = "mc_pipeline/list"
MAILCHIMP_ACCOUNT = "mc_pipeline/mailchimp_account"
OMETRIA_ACCOUNT = "mc_pipeline/ometria_account"
SYNC_KIND = "mc_pipeline/sync"  # "initial", "incremental", "full_refresh", "manual"


def run_tags(client: Client, list_id: str, kind: str) -> dict[str, str]:
    return {
        CLIENT: client.id,
        LIST: list_id,
        MAILCHIMP_ACCOUNT: client.mailchimp.account or client.id,
        OMETRIA_ACCOUNT: client.ometria.account or client.id,
        SYNC_KIND: kind,
    }
