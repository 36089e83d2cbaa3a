"""Every run of the sync job carries the account tags the run queue limits, however it is launched."""

from __future__ import annotations

from dagster import DagsterInstance

from mc_pipeline.definitions import defs
from mc_pipeline.jobs import SYNC_JOB, partition_tags
from mc_pipeline.local import LocalEnvironment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.tags import LIST_NAME, MAILCHIMP_ACCOUNT, OMETRIA_ACCOUNT, SYNC_KIND


def test_a_launched_partition_run_is_tagged_with_its_accounts(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    key = small_env.partition_keys()[0]
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, [key])
    result = defs.resolve_job_def(SYNC_JOB).execute_in_process(instance=instance, partition_key=key)
    assert result.success
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags[MAILCHIMP_ACCOUNT] == "client-1" and tags[OMETRIA_ACCOUNT] == "client-1"
    # No client/list chips: the partition names both. The kind and the list's name the run adds as it starts.
    # The host and pid the run guard records are hidden tags (`.dagster/`): bookkeeping, not chips.
    shown = {k for k in tags if not k.startswith((".dagster/", "dagster/"))}
    assert shown == {MAILCHIMP_ACCOUNT, OMETRIA_ACCOUNT, SYNC_KIND, LIST_NAME}, tags
    list_id = key.split(":")[1]
    assert tags[SYNC_KIND] == "initial" and tags[LIST_NAME] == small_env.sandbox.mailchimp_list(list_id).name


def test_a_run_requests_kind_survives_the_partition_tags(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """The sensor's "initial" and the schedule's "incremental" must reach the run."""
    key = small_env.partition_keys()[0]
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, [key])
    job = defs.resolve_job_def(SYNC_JOB)
    tags = job.partitioned_config.get_tags_for_partition_key(key)
    assert SYNC_KIND not in tags
    result = job.execute_in_process(instance=instance, partition_key=key, tags={SYNC_KIND: "initial"})
    assert instance.get_run_by_id(result.run_id).tags[SYNC_KIND] == "initial"


def test_shared_accounts_are_named_by_the_registry(small_env: LocalEnvironment) -> None:
    text = small_env.registry.read_text().replace(
        "    base_url: http", "    account: shared-acct\n    base_url: http", 1
    )
    small_env.registry.write_text(text)
    tags = partition_tags(small_env.partition_keys()[0])
    assert tags[MAILCHIMP_ACCOUNT] == "shared-acct" and tags[OMETRIA_ACCOUNT] == "client-1"
