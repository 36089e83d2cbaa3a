"""What the UI shows of the definitions: every asset described, owned, typed, linked to its code; every
materialization with its row count, column schema and the list's name; every schedule described."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from dagster import DagsterInstance, TableSchema

from mc_pipeline.assets.metadata import human_bytes
from mc_pipeline.automation.checks import dead_letter_state, stale_partitions
from mc_pipeline.definitions import defs
from mc_pipeline.jobs import SYNC_JOB
from mc_pipeline.local import LocalEnvironment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.tags import LIST_NAME, SYNC_KIND
from mc_pipeline_tests.helpers import metadata, sync

ASSET_KEYS = {"mailchimp/member_pages", "mailchimp/members", "ometria/contacts"}


def test_every_asset_has_owners_description_kinds_code_references_and_a_column_schema() -> None:
    from dagster import DagsterInstance

    # Resolving reads the current instance's definitions state: a live one of its own, so an instance
    # an earlier test left entered and then lost (a dead weakref, seen under xdist) cannot break it.
    with DagsterInstance.ephemeral():
        specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    assert set(specs) == ASSET_KEYS
    for key, spec in specs.items():
        assert spec.owners and spec.description and spec.kinds, key
        assert spec.metadata["dagster/code_references"].code_references, key
        schema = spec.metadata["dagster/column_schema"]
        assert isinstance(schema, TableSchema) and schema.columns, key
    contacts = {c.name for c in specs["ometria/contacts"].metadata["dagster/column_schema"].columns}
    assert {"id", "email", "marketing_optin"} <= contacts


def test_a_sync_records_row_count_column_schema_and_list_name_on_every_asset(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    key = small_env.partition_keys()[0]
    name = small_env.sandbox.mailchimp_list(key.split(":")[1]).name
    result = sync(instance, key)
    contacts = metadata(result, "ometria/contacts")
    assert contacts["dagster/row_count"] == contacts["records"] == 1200
    assert isinstance(contacts["dagster/column_schema"], TableSchema)
    assert contacts["list_name"] == name and name
    pages = metadata(result, "mailchimp/member_pages")
    assert pages["list_name"] == name and pages["dagster/row_count"] == pages["rows_fetched"]
    # A full sync has no lower bound: no `window_since`, and it says so; `window_before` is a timestamp.
    assert "window_since" not in pages and pages["window"] == "full sync"
    assert isinstance(pages["window_before"], float) and isinstance(pages["bytes"], int)
    assert pages["bytes_human"] == human_bytes(pages["bytes"])
    run_tags = instance.get_run_by_id(result.run_id).tags
    assert run_tags[LIST_NAME] == name and run_tags[SYNC_KIND] == "initial"
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "counts_reconcile")
    assert check.passed and check.metadata["list_name"].value == name
    # The per-list checks read it back: the freshness table names the list, the dead-letter check too.
    [(_, stale_name, *_)] = stale_partitions(instance, time.time() + 3 * 3600)
    assert stale_name == name
    assert (dead_letter_state(instance, key) or {})["list_name"] == name

    small_env.sandbox.clock.advance(1)
    again = sync(instance, key)
    pages = metadata(again, "mailchimp/member_pages")
    assert datetime.fromtimestamp(pages["window_since"], UTC) < datetime.fromtimestamp(pages["window_before"], UTC)
    assert metadata(again, "ometria/contacts")["list_name"] == name  # reused: an incremental run asks nothing more
    assert instance.get_run_by_id(again.run_id).tags[SYNC_KIND] == "incremental"


def test_every_schedule_has_a_description() -> None:
    schedules = list(defs.schedules or [])
    assert schedules
    for schedule in schedules:
        assert schedule.description, schedule.name


@pytest.mark.parametrize(("full_refresh", "kind"), [(False, "incremental"), (True, "full_refresh")])
def test_a_backfill_or_launchpad_run_carries_the_sync_kind_tag(
    small_env: LocalEnvironment, instance: DagsterInstance, full_refresh: bool, kind: str
) -> None:
    """A job run launched without a kind (a backfill's runs, the launchpad) is tagged as the schedules
    tag theirs; the partition's own config is incremental; one asking for a full refresh says so."""
    key = small_env.partition_keys()[0]
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, [key])
    job = defs.resolve_job_def(SYNC_JOB)
    assert job.execute_in_process(instance=instance, partition_key=key).success  # the list's initial sync
    config = job.partitioned_config.get_run_config_for_partition_key(key)
    config["ops"]["mailchimp__member_pages"]["config"]["full_refresh"] = full_refresh
    result = job.execute_in_process(instance=instance, partition_key=key, run_config=config)
    assert instance.get_run_by_id(result.run_id).tags[SYNC_KIND] == kind
