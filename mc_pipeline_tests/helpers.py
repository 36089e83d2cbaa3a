"""Helpers for end-to-end tests: run syncs, compare Ometria with Mailchimp."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = [
    "DAGSTER_CLI",
    "after_bound_listing",
    "assert_ometria_matches",
    "dagster_materialize_command",
    "expected_contacts",
    "metadata",
    "set_ometria_rate",
    "settle",
    "step_failure_message",
    "sync",
    "window_pages",
]

import yaml
from dagster import DagsterInstance, ExecuteInProcessResult, materialize

from mc_pipeline.assets import ASSETS
from mc_pipeline.assets.checks import counts_reconcile
from mc_pipeline.definitions import resources
from mc_pipeline.jobs import sync_run_config
from mc_pipeline.local import LocalEnvironment, expected_contacts, ometria_differences
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import parse_partition_key
from mc_pipeline.resources.paging import AFTER_BOUND_FIELDS_PARAM, CLOCK_MARGIN_S, OUR_CLOCK, SKEW_MARGIN_S
from mc_pipeline.sandbox import Sandbox
from mc_pipeline.sandbox.stats import RequestRecord


def sync(
    instance: DagsterInstance,
    partition: str,
    *,
    full_refresh: bool = False,
    push_all: bool = False,
    raise_on_error: bool = True,
    overrides: dict[str, Any] | None = None,
    checks: tuple[Any, ...] = (counts_reconcile,),
) -> ExecuteInProcessResult:
    if not instance.has_dynamic_partition(MAILCHIMP_LISTS, partition):
        instance.add_dynamic_partitions(MAILCHIMP_LISTS, [partition])
    return materialize(
        [*ASSETS, *checks],
        partition_key=partition,
        instance=instance,
        resources={**resources(), **(overrides or {})},
        run_config=sync_run_config(full_refresh, push_all),
        raise_on_error=raise_on_error,
    )


def settle(sb: Sandbox) -> None:
    """Let the changes just made fall inside the next run's window, without waiting for it: time passes,
    on Mailchimp's clock (the sandbox's) and on ours alike.

    A change is stamped with the sandbox's clock to the second; an incremental window ends `CLOCK_MARGIN_S`
    before the Date of the run's first answer (the sandbox's clock), a full sync's `CLOCK_MARGIN_S` +
    `SKEW_MARGIN_S` before our clock: that many seconds on is exactly enough for both.
    """
    step = CLOCK_MARGIN_S + SKEW_MARGIN_S
    sb.clock.advance(step)
    OUR_CLOCK.offset_s += step


def after_bound_listing(r: RequestRecord) -> bool:
    """A full sync's ids-only listing of the members changed after its bound (after its pages), not a page."""
    return "since_last_changed" in r.query and r.query.get("fields") == AFTER_BOUND_FIELDS_PARAM


def window_pages(log: list[RequestRecord]) -> list[RequestRecord]:
    """The requests of a log that page a window: all but the after-bound listings."""
    return [r for r in log if not after_bound_listing(r)]


def failed_at_once(env: LocalEnvironment, label: str = "mailchimp:client-1") -> bool:
    """No Mailchimp request retried: a full sync's pages start together (at most one per connection),
    each failing on its first answer, and none starts after the first failure."""
    offsets = [r.query.get("offset") for r in env.sandbox.request_log(label)]
    return 1 <= len(offsets) <= 10 and len(set(offsets)) == len(offsets)


def set_ometria_rate(env: LocalEnvironment, sandbox_per_second: int = 1000, client_per_second: float = 100) -> None:
    """Ometria's push limit: the sandbox's and the registry's (the client's limiter, at most 100).
    The defaults are a raised plan limit, for tests whose subject is not the 8 pushes a second;
    `(env, 8, 8)` is the plan's, for a test whose subject is (what is sent before a refusal lands)."""
    env.sandbox.config.ometria.rate_per_second = sandbox_per_second
    registry = yaml.safe_load(env.registry.read_text())
    for client in registry["clients"]:
        client["ometria"]["requests_per_second"] = client_per_second
    env.registry.write_text(yaml.safe_dump(registry))


def metadata(result: ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        if mat.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in mat.metadata.items()}
    raise AssertionError(f"no materialization of {asset}")


def assert_ometria_matches(sb: Sandbox, partition: str, collection_prefix: str = "mailchimp") -> None:
    client_id, list_id = parse_partition_key(partition)
    problems = ometria_differences(sb, client_id, list_id, f"{collection_prefix}-{list_id}")
    assert not problems, f"{partition}: " + "; ".join(problems)


def step_failure_message(result: ExecuteInProcessResult) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return failure.event_specific_data.error.message  # type: ignore[union-attr]


DAGSTER_CLI = str(Path(sys.executable).with_name("dagster"))


def dagster_materialize_command(partition: str, *extra: str) -> list[str]:
    """The README's command: materialize a partition's three assets with the dagster CLI."""
    return [
        DAGSTER_CLI,
        "asset",
        "materialize",
        "-m",
        "mc_pipeline.definitions",
        "--select",
        "mailchimp/member_pages*",
        "--partition",
        partition,
        *extra,
    ]
