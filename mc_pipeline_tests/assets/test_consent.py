"""Consent end to end (issue 9, item 16): real `materialize` runs against the sandbox's Ometria,
which models Ometria's subscription hierarchy (sandbox/consent.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance

from mc_pipeline.local import LocalEnvironment
from mc_pipeline.registry import write_registry
from mc_pipeline.sandbox import Sandbox
from mc_pipeline_tests.conftest import make_env
from mc_pipeline_tests.helpers import settle, sync

IN, OUT = "EXPLICITLY_OPTEDIN", "EXPLICITLY_OPTEDOUT"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[LocalEnvironment]:
    with make_env(tmp_path, clients=1, lists_per_client=1, members=[60]) as e:  # type: ignore[attr-defined]
        yield e


def set_force_optin(env: LocalEnvironment, value: bool) -> None:
    clients = yaml.safe_load(env.registry.read_text())["clients"]
    clients[0]["ometria"]["force_optin"] = value
    write_registry(env.registry, clients)


def target(env: LocalEnvironment) -> tuple[Sandbox, str, str, str]:
    """The sandbox, its one list, that list's partition and its Ometria collection."""
    list_id = env.sandbox.client("client-1").list_ids[0]
    return env.sandbox, list_id, f"client-1:{list_id}", f"mailchimp-{list_id}"


def subscribed(env: LocalEnvironment, list_id: str) -> list[dict]:
    return [
        m for m in env.sandbox.mailchimp_list(list_id).members(include_archived=False) if m["status"] == "subscribed"
    ]


def test_an_ometria_unsubscribe_survives_a_full_refresh_unless_the_client_forces_opt_ins(
    env: LocalEnvironment, instance: DagsterInstance
) -> None:
    sb, list_id, partition, collection = target(env)
    assert sync(instance, partition).success
    person, leaver, stays = subscribed(env, list_id)[:3]
    assert sb.ometria_subscription("client-1", collection, stays["contact_id"])["events"] == ["subscribed"]

    sb.ometria_unsubscribe("client-1", collection, person["contact_id"])  # their Ometria unsubscribe link
    sb.set_status(list_id, leaver["id"], "unsubscribed")  # an opt-out made in Mailchimp
    settle(sb)  # inside the full refresh's window
    assert sync(instance, partition, full_refresh=True).success
    held = sb.ometria_contacts("client-1", collection)
    assert held[person["contact_id"]]["marketing_optin"] == OUT  # the person's choice in Ometria holds
    assert held[leaver["contact_id"]]["marketing_optin"] == OUT  # Mailchimp's opt-outs still arrive
    assert held[stays["contact_id"]]["marketing_optin"] == IN
    assert sb.ometria_subscription("client-1", collection, stays["contact_id"])["forced"] is None

    set_force_optin(env, True)  # the documented risk: a forced opt-in overrides the Ometria opt-out
    assert sync(instance, partition, full_refresh=True).success
    assert sb.ometria_contacts("client-1", collection)[person["contact_id"]]["marketing_optin"] == IN


def test_a_mailchimp_opt_out_beats_an_opt_in_forced_by_an_earlier_run(
    env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """Earlier versions (and `force_optin: true`) forced every opt-in; an unforced opt-out would not beat it."""
    sb, list_id, partition, collection = target(env)
    set_force_optin(env, True)
    assert sync(instance, partition).success
    leaver, deleted = subscribed(env, list_id)[:2]
    assert sb.ometria_subscription("client-1", collection, leaver["contact_id"])["forced"] == IN

    set_force_optin(env, False)
    sb.set_status(list_id, leaver["id"], "unsubscribed")
    sb.delete_member(list_id, deleted["id"])
    settle(sb)  # the opt-out inside the full refresh's window
    assert sync(instance, partition, full_refresh=True).success
    held = sb.ometria_contacts("client-1", collection)
    assert held[leaver["contact_id"]]["marketing_optin"] == OUT
    assert held[deleted["contact_id"]]["marketing_optin"] == OUT  # the tombstone, forced too
