"""The README's `dagster asset materialize` commands, run as written (the sandbox stands in for the APIs)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from mc_pipeline.local import patched_environ, sandbox_environment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.sandbox import SandboxConfig
from mc_pipeline_tests.helpers import assert_ometria_matches, dagster_materialize_command, set_ometria_rate

FULL_REFRESH = json.dumps({"ops": {"mailchimp__member_pages": {"config": {"full_refresh": True}}}})


def materialize(partition: str, *extra: str) -> None:
    done = subprocess.run(
        dagster_materialize_command(partition, *extra), capture_output=True, env=dict(os.environ), timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def test_materialize_and_full_refresh_from_the_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    config = SandboxConfig.generated(clients=1, lists_per_client=1, members=1200)
    with sandbox_environment(config, tmp_path / "work") as env, patched_environ({"DAGSTER_HOME": str(home)}):
        set_ometria_rate(env)  # read by the CLI's own process from the registry
        partition = env.partition_keys()[0]
        with DagsterInstance.get() as instance:
            instance.add_dynamic_partitions(MAILCHIMP_LISTS, [partition])
        materialize(partition)
        materialize(partition, "--config-json", FULL_REFRESH)
        with DagsterInstance.get() as instance:
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey(["mailchimp", "member_pages"]), asset_partitions=[partition]),
                limit=2,
            ).records
            flags = [r.asset_materialization.metadata["full_refresh"].value for r in records]
        assert flags == [True, True]  # the first sync had no watermark; the second was forced full
        # The full refresh pushed nothing: every record was unchanged.
        assert env.sandbox.ometria_writes("client-1") == len(env.sandbox.ometria_contacts("client-1"))
        assert_ometria_matches(env.sandbox, partition)
