"""Helpers for end-to-end tests: run syncs, compare Ometria with Mailchimp."""

from __future__ import annotations

from typing import Any

from dagster import DagsterInstance, ExecuteInProcessResult, materialize

from mc_pipeline.assets import ASSETS
from mc_pipeline.definitions import resources
from mc_pipeline.jobs import sync_run_config
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import parse_partition_key
from mc_pipeline.sandbox import Sandbox
from mc_pipeline.transform import OPTIN


def sync(
    instance: DagsterInstance, partition: str, *, full_refresh: bool = False, raise_on_error: bool = True
) -> ExecuteInProcessResult:
    if not instance.has_dynamic_partition(MAILCHIMP_LISTS, partition):
        instance.add_dynamic_partitions(MAILCHIMP_LISTS, [partition])
    return materialize(
        ASSETS,
        partition_key=partition,
        instance=instance,
        resources=resources(),
        run_config=sync_run_config(full_refresh),
        raise_on_error=raise_on_error,
    )


def metadata(result: ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        if mat.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in mat.metadata.items()}
    raise AssertionError(f"no materialization of {asset}")


def expected_contacts(sb: Sandbox, list_id: str) -> dict[str, dict[str, Any]]:
    """What Ometria should hold for a list: every member Mailchimp lists by default, by contact id."""
    return {m["contact_id"]: m for m in sb.mailchimp_list(list_id).members(include_archived=False)}


def assert_ometria_matches(sb: Sandbox, partition: str, collection_prefix: str = "mailchimp") -> None:
    client_id, list_id = parse_partition_key(partition)
    held = sb.ometria_contacts(client_id, f"{collection_prefix}-{list_id}")
    expected = expected_contacts(sb, list_id)
    assert set(held) == set(expected), (
        f"{partition}: {len(set(expected) - set(held))} missing, {len(set(held) - set(expected))} unexpected"
    )
    for cid, member in expected.items():
        record = held[cid]
        assert record["email"] == member["email_address"].strip(), cid
        assert record["marketing_optin"] == OPTIN[member["status"]], cid
