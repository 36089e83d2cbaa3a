"""The registry sensor and the failure sensor, evaluated with Dagster's own contexts against an instance."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import (
    AddDynamicPartitionsRequest,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    DeleteDynamicPartitionsRequest,
    SensorResult,
    SkipReason,
    build_run_status_sensor_context,
    build_sensor_context,
)

from mc_pipeline.assets.keys import CONTACTS_KEY
from mc_pipeline.automation import sensors as sensors_module
from mc_pipeline.automation.sensors import mailchimp_lists_sensor, sync_failure_alerts
from mc_pipeline.local import LocalEnvironment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import YamlClientRegistry
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.tags import MAILCHIMP_ACCOUNT, SYNC_KIND
from mc_pipeline_tests.helpers import sync


def evaluate(instance: DagsterInstance, registry: Path, cursor: str | None = None) -> SensorResult | SkipReason:
    context = build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"registry": ClientRegistryResource(path=str(registry)), "mailchimp": MailchimpResource()},
    )
    return mailchimp_lists_sensor(context)


def apply(instance: DagsterInstance, result: SensorResult) -> None:
    """What the daemon does with a tick's partition requests."""
    for req in result.dynamic_partitions_requests or []:
        if isinstance(req, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        elif isinstance(req, DeleteDynamicPartitionsRequest):
            for key in req.partition_keys:
                instance.delete_dynamic_partition(req.partitions_def_name, key)


def edit_registry(path: Path, fn: Any) -> None:
    data = yaml.safe_load(path.read_text())
    fn(data["clients"])
    path.write_text(yaml.safe_dump(data))


def test_new_lists_become_partitions_with_a_full_sync(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    result = evaluate(instance, small_env.registry)
    assert isinstance(result, SensorResult)
    keys = small_env.partition_keys()
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [sorted(keys)]
    assert sorted(r.partition_key for r in result.run_requests) == sorted(keys)
    for request in result.run_requests:
        assert request.run_config["ops"]["mailchimp__member_pages"]["config"]["full_refresh"] is True
        assert request.tags[MAILCHIMP_ACCOUNT] == "client-1" and len(request.tags) == 3  # no client or list chip
        assert request.tags[SYNC_KIND] == "initial" and request.run_key == f"initial:{request.partition_key}"
    apply(instance, result)
    assert sorted(instance.get_dynamic_partitions(MAILCHIMP_LISTS)) == sorted(keys)

    again = evaluate(instance, small_env.registry, result.cursor)
    assert isinstance(again, SensorResult) and not again.run_requests and not again.dynamic_partitions_requests


def test_a_list_removed_from_the_registry_loses_its_partition(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    first = evaluate(instance, small_env.registry)
    apply(instance, first)
    dropped = small_env.sandbox.client("client-1").list_ids[0]
    edit_registry(small_env.registry, lambda clients: clients[0]["lists"].remove(dropped))
    # A deletion waits one tick: a registry read while it is rewritten is not still so a tick later.
    waiting = evaluate(instance, small_env.registry, first.cursor)
    assert not waiting.dynamic_partitions_requests and "wait for the next tick" in waiting.skip_reason.skip_message
    result = evaluate(instance, small_env.registry, waiting.cursor)
    assert [(type(r).__name__, list(r.partition_keys)) for r in result.dynamic_partitions_requests] == [
        ("DeleteDynamicPartitionsRequest", [f"client-1:{dropped}"])
    ]
    assert not result.run_requests


def test_a_bad_registry_changes_nothing(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    apply(instance, evaluate(instance, small_env.registry))
    before = sorted(instance.get_dynamic_partitions(MAILCHIMP_LISTS))
    good = small_env.registry.read_text()
    for breakage in (
        lambda c: c[0].update({"colour": "red"}),  # unknown field
        lambda c: c[0]["mailchimp"].pop("api_key"),  # missing credential
        lambda c: c.append(dict(c[0])),  # duplicate id
        lambda c: c[0].update({"lists": ["not-a-list-id"]}),  # malformed list id
        lambda c: c[0].update({"lists": ["../../../etc"]}),  # hostile
    ):
        small_env.registry.write_text(good)
        edit_registry(small_env.registry, breakage)
        result = evaluate(instance, small_env.registry)
        assert isinstance(result, SkipReason)
        assert "registry was refused" in result.skip_message and str(small_env.registry) in result.skip_message
        assert sorted(instance.get_dynamic_partitions(MAILCHIMP_LISTS)) == before


def test_all_lists_of_an_account_are_found_once_an_hour(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    edit_registry(small_env.registry, lambda clients: clients[0].update({"lists": "all"}))
    sb = small_env.sandbox
    first = evaluate(instance, small_env.registry)
    assert sorted(r.partition_key for r in first.run_requests) == sorted(small_env.partition_keys())
    assert sb.stats("mailchimp:client-1")["routes"] == {"GET /3.0/lists": 1}
    apply(instance, first)
    sb.add_list("client-1", "00000000aa", members=10)  # a new audience appears in Mailchimp...
    second = evaluate(instance, small_env.registry, first.cursor)
    assert not second.run_requests  # ...but the cached answer is under an hour old: no call, no change
    assert sb.stats("mailchimp:client-1")["requests"] == 1
    cursor = json.loads(first.cursor)
    cursor["all"]["client-1"]["at"] -= 3601
    third = evaluate(instance, small_env.registry, json.dumps(cursor))
    assert [r.partition_key for r in third.run_requests] == ["client-1:00000000aa"]


def test_an_unreachable_all_account_keeps_its_partitions(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    edit_registry(small_env.registry, lambda clients: clients[0].update({"lists": "all"}))
    first = evaluate(instance, small_env.registry)
    apply(instance, first)
    small_env.sandbox.revoke("client-1", "mailchimp")
    cursor = json.loads(first.cursor)
    cursor["all"]["client-1"]["at"] -= 3601
    result = evaluate(instance, small_env.registry, json.dumps(cursor))
    assert not result.dynamic_partitions_requests
    assert len(instance.get_dynamic_partitions(MAILCHIMP_LISTS)) == 2


@pytest.mark.slow
def test_thousands_of_lists_are_added_a_bounded_batch_per_tick(
    small_env: LocalEnvironment, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sensors_module, "MAX_NEW_PER_TICK", 100)
    many = [f"{i:010x}" for i in range(5000)]
    edit_registry(small_env.registry, lambda clients: clients[0].update({"lists": many}))
    cursor, added, ticks = None, 0, 0
    while added < 5000:
        result = evaluate(instance, small_env.registry, cursor)
        assert len(result.run_requests) <= 100
        apply(instance, result)
        added += len(result.run_requests)
        cursor, ticks = result.cursor, ticks + 1
    assert ticks == 50 and len(instance.get_dynamic_partitions(MAILCHIMP_LISTS)) == 5000
    assert small_env.sandbox.stats("mailchimp:client-1")["requests"] == 0  # explicit lists need no API call


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_failed_sync_is_recorded_on_its_partition_and_posted(
    small_env: LocalEnvironment, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MC_PIPELINE_ALERT_WEBHOOK", f"http://127.0.0.1:{server.server_port}/hook")
    _Hook.received.clear()
    sb = small_env.sandbox
    list_id = sb.client("client-1").list_ids[0]
    partition = f"client-1:{list_id}"
    sb.revoke("client-1", "mailchimp")
    result = sync(instance, partition, raise_on_error=False)
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    failure_event = instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_FAILURE)[0].dagster_event
    context = build_run_status_sensor_context(
        sensor_name="sync_failure_alerts", dagster_event=failure_event, dagster_instance=instance, dagster_run=run
    ).for_run_failure()
    sync_failure_alerts(context)
    server.shutdown()

    observations = instance.fetch_observations(
        AssetRecordsFilter(asset_key=CONTACTS_KEY, asset_partitions=[partition]), limit=5
    ).records
    assert len(observations) == 1
    md = {k: v.value for k, v in observations[0].asset_observation.metadata.items()}
    assert md["client"] == "client-1" and md["list"] == list_id and md["run_id"] == result.run_id
    assert "403 User Disabled" in md["cause"] and md["retryable"] is False
    assert len(_Hook.received) == 1
    hook = _Hook.received[0]
    assert hook["partition"] == partition and "403 User Disabled" in hook["cause"]
    key = sb.client("client-1").mailchimp_key
    assert key not in json.dumps(hook) and key not in json.dumps(md)


# --------------------------------------------------------------------------- a registry being rewritten
def forty_lists(path: Path) -> list[str]:
    """Three clients with 20, 10 and 10 explicit lists (no Mailchimp call needed); their keys."""

    def grow(clients: list[dict[str, Any]]) -> None:
        clients[0]["lists"] = [f"{i:010x}" for i in range(20)]
        for n in (2, 3):
            clients.append({**clients[0], "id": f"client-{n}", "lists": [f"{n:02x}{i:08x}" for i in range(10)]})

    edit_registry(path, grow)
    data = yaml.safe_load(path.read_text())
    order = ("id", "mailchimp", "ometria", "lists")  # as `write_registry` writes: a cut in `lists` still parses
    data["clients"] = [{k: c[k] for k in order} for c in data["clients"]]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return sorted(f"{c['id']}:{x}" for c in yaml.safe_load(path.read_text())["clients"] for x in c["lists"])


def settle(instance: DagsterInstance, registry: Path, cursor: str | None = None, ticks: int = 2) -> str | None:
    for _ in range(ticks):
        result = evaluate(instance, registry, cursor)
        if isinstance(result, SensorResult):
            apply(instance, result)
            cursor = result.cursor
    return cursor


def partitions(instance: DagsterInstance) -> list[str]:
    return sorted(instance.get_dynamic_partitions(MAILCHIMP_LISTS))


def test_a_registry_read_while_it_is_rewritten_deletes_no_partition(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    """Issue 9 item 9: an empty file was read as 'no clients' and every partition deleted. Every
    state a file passes through while rewritten in place (empty, cut anywhere) keeps them all."""
    keys = forty_lists(small_env.registry)
    good = small_env.registry.read_text()
    cursor = settle(instance, small_env.registry)
    assert partitions(instance) == keys
    lines = good.splitlines(keepends=True)
    states = ["", "\n", "# being written\n", "clients: []\n", "clients:\n", good[: len(good) // 2]]
    states += ["".join(lines[:n]) for n in range(1, len(lines))]  # cut at every line: most still parse
    states += [good[:n] for n in range(7, len(good), 97)]  # and inside lines
    reasons = set()
    for state in states:
        small_env.registry.write_text(state)
        result = evaluate(instance, small_env.registry, cursor)  # one tick sees it, the next the whole file
        if isinstance(result, SensorResult):
            apply(instance, result)
            assert not result.run_requests
        assert partitions(instance) == keys, f"a registry cut to {len(state)} of {len(good)} bytes deleted partitions"
        reasons.add(result.skip_message if isinstance(result, SkipReason) else result.skip_reason.skip_message)
        small_env.registry.write_text(good)
        again = evaluate(instance, small_env.registry, result.cursor if isinstance(result, SensorResult) else cursor)
        assert not again.dynamic_partitions_requests and not again.run_requests
        cursor = again.cursor
    for kind in ("registry was refused", "registry is empty", "no clients: refused", "was held", "wait for the next"):
        assert any(kind in r for r in reasons), kind  # every way of keeping them was taken


def test_a_half_registry_is_held_however_long_it_stays(small_env: LocalEnvironment, instance: DagsterInstance) -> None:
    """A writer that died mid-file leaves half a registry for good: it is held, not obeyed, and the
    tick says what to do; naming the clients under `removed:` confirms it."""
    keys = forty_lists(small_env.registry)
    good = small_env.registry.read_text()
    cursor = settle(instance, small_env.registry)
    half = good[: good.index("- id: client-2")]  # client-1's 20 lists: half the partitions, half the file
    assert len(half) < len(good) * 0.6 and YamlClientRegistry(_write(small_env.registry, half)).clients()
    for _ in range(5):
        result = evaluate(instance, small_env.registry, cursor)
        assert isinstance(result, SensorResult) and not result.dynamic_partitions_requests
        cursor = result.cursor
    message = result.skip_reason.skip_message
    assert "was held" in message and "no partition changed" in message
    assert "it would delete 20 of 40 partitions at once" in message and "`removed:`" in message
    assert partitions(instance) == keys

    small_env.registry.write_text("removed: [client-2, client-3]\n" + half)
    result = evaluate(instance, small_env.registry, cursor)
    apply(instance, result)
    assert partitions(instance) == [k for k in keys if k.startswith("client-1:")]


def test_a_real_removal_of_a_client_still_deletes_its_partitions(
    small_env: LocalEnvironment, instance: DagsterInstance
) -> None:
    keys = forty_lists(small_env.registry)
    cursor = settle(instance, small_env.registry)
    edit_registry(small_env.registry, lambda clients: clients.pop())  # client-3: 10 of 40 partitions
    waiting = evaluate(instance, small_env.registry, cursor)
    assert not waiting.dynamic_partitions_requests
    result = evaluate(instance, small_env.registry, waiting.cursor)
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [
        [k for k in keys if k.startswith("client-3:")]
    ]
    apply(instance, result)
    # Every other client, named under `removed:`: deleted without a hold, once two ticks agree.
    small_env.registry.write_text(yaml.safe_dump({"removed": ["client-1", "client-2"], "clients": []}))
    cursor = settle(instance, small_env.registry, result.cursor)
    assert partitions(instance) == []
    assert json.loads(cursor)["size"] == 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
