"""Change-aware incremental syncs: slots in the hour, probes of Mailchimp, verifications in Dagster.

The end-to-end test is the issue's CI-size proof: 200 lists (20 accounts x 10), 10 changed, the
schedule's twelve ticks of one hour evaluated against a real instance and the sandbox, then the
requested runs executed: exactly the 10 changed lists imported, the 190 others verified, no run.
"""

from __future__ import annotations

import collections
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import AssetObservation, DagsterInstance, RunRequest, build_schedule_context

from mc_pipeline.assets.keys import CONTACTS_KEY
from mc_pipeline.assets.models import Destination
from mc_pipeline.assets.watermarks import (
    VERIFIED_AT,
    destination_of,
    latest_events,
    latest_watermarks,
    record_import,
    verification_metadata,
)
from mc_pipeline.automation.checks import dead_letter_state, last_imports
from mc_pipeline.automation.probes import Cadence
from mc_pipeline.automation.schedules import hourly_incremental_sync
from mc_pipeline.dead_letters import OUTSTANDING
from mc_pipeline.definitions import defs
from mc_pipeline.jobs import SYNC_JOB
from mc_pipeline.local import LocalEnvironment, patched_environ, sandbox_environment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import YamlClientRegistry, parse_partition_key
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.sandbox import SandboxConfig

HOUR = datetime(2026, 11, 23, 14, 0, tzinfo=UTC)
TICKS = [HOUR + timedelta(minutes=5 * i) for i in range(12)]


# ---------------------------------------------------------------------------- slots
def test_each_list_has_one_stable_slot_per_hour_and_the_hour_is_spread_evenly() -> None:
    cadence = Cadence()
    assert cadence.cron == "*/5 * * * *"
    keys = [f"client-{i % 2000}:{i:010x}" for i in range(10_000)]
    per_tick = collections.Counter()
    for key in keys:
        due = [t for t in TICKS if cadence.slot_in_tick(key, t) is not None]
        assert len(due) == 1, key  # every list verified or synced once in each hour, exactly once
        slot = cadence.slot_in_tick(key, due[0])
        assert due[0] <= slot < due[0] + timedelta(minutes=5)
        assert Cadence().slot_in_tick(key, due[0] + timedelta(hours=7)) == slot + timedelta(hours=7)  # stable
        per_tick[due[0]] += 1
    assert max(per_tick.values()) < 1.1 * 10_000 / 12 and min(per_tick.values()) > 0.9 * 10_000 / 12
    # Within a tick, slots spread too: the first and the second half of each tick hold about half each.
    firsts = sum(1 for k in keys for t in TICKS if (s := cadence.slot_in_tick(k, t)) and s < t + timedelta(seconds=150))
    assert 0.45 < firsts / len(keys) < 0.55


def test_near_real_time_cadence_verifies_every_list_every_five_minutes() -> None:
    cadence = Cadence(every_s=300, tick_s=60)
    assert cadence.cron == "*/1 * * * *"
    minutes = [HOUR + timedelta(minutes=i) for i in range(60)]
    for key in (f"client-1:{i:010x}" for i in range(200)):
        assert len([m for m in minutes if cadence.slot_in_tick(key, m)]) == 12
    with pytest.raises(ValueError, match="must divide"):
        Cadence(every_s=7 * 60, tick_s=60)
    with pytest.raises(ValueError, match="must divide"):
        Cadence(every_s=600, tick_s=240)
    with patched_environ({"MC_PIPELINE_VERIFY_EVERY_MIN": "5", "MC_PIPELINE_PROBE_TICK_MIN": ""}):
        assert Cadence.from_env() == cadence  # the setting: every 5 minutes, ticking each minute
    override = Cadence(cron_override="* * * * *")  # demos and benchmarks: every tick takes every list
    assert override.cron == "* * * * *" and override.slot_in_tick("client-1:0123456789", HOUR) == HOUR


# ---------------------------------------------------------------------------- watermarks
DEST_A = Destination(base_url="https://api.ometria.com", account="a", collection="mailchimp-1", key="k1")
DEST_B = DEST_A.model_copy(update={"collection": "other-1"})
W0 = datetime(2026, 11, 23, 13, 0, tzinfo=UTC)


def record_verification(instance: DagsterInstance, partition: str, watermark: datetime, dest: Destination) -> None:
    md = verification_metadata(dest, watermark, watermark, watermark)
    instance.report_runless_asset_event(AssetObservation(asset_key=CONTACTS_KEY, partition=partition, metadata=md))


def test_the_next_window_starts_from_the_newest_import_or_verification_of_the_destination(
    instance: DagsterInstance,
) -> None:
    key = "client-1:0123456789"
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, [key])
    record_import(instance, key, W0, DEST_A)
    assert latest_watermarks(instance, key, DEST_A).since == W0
    w1 = W0 + timedelta(hours=1)
    record_verification(instance, key, w1, DEST_A)
    replay = {OUTSTANDING: 0, "outstanding_share": 0.0}
    instance.report_runless_asset_event(AssetObservation(asset_key=CONTACTS_KEY, partition=key, metadata=replay))
    record_verification(instance, key, W0 + timedelta(hours=5), DEST_B)  # another destination's: not ours
    marks = latest_watermarks(instance, key, DEST_A)
    assert marks.since == w1 and marks.archived_since == w1 and marks.why_full is None
    assert latest_watermarks(instance, key, DEST_B).why_full.startswith("the destination changed")
    # Freshness counts the verification, not the replay: the time of the verification of DEST_A.
    imported, verified = latest_events(instance)[key]
    assert VERIFIED_AT in verified.asset_observation.metadata and last_imports(instance)[key] == verified.timestamp
    assert verified.timestamp > imported.timestamp
    # A later import wins over earlier verifications.
    w2 = W0 + timedelta(hours=2)
    record_import(instance, key, w2, DEST_A)
    assert latest_watermarks(instance, key, DEST_A).since == w2 and latest_events(instance)[key][1] is None


def test_a_replay_stays_the_dead_letter_state_under_many_later_verifications(instance: DagsterInstance) -> None:
    """Hourly verifications are observations too: a day of them must not hide the last replay."""
    key = "client-1:0123456789"
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, [key])
    record_import(instance, key, W0, DEST_A)
    replay = {OUTSTANDING: 3, "outstanding_share": 0.01}
    instance.report_runless_asset_event(AssetObservation(asset_key=CONTACTS_KEY, partition=key, metadata=replay))
    for hour in range(30):
        record_verification(instance, key, W0 + timedelta(hours=hour + 1), DEST_A)
    state = dead_letter_state(instance, key)
    assert state is not None and state[OUTSTANDING] == 3
    assert latest_watermarks(instance, key, DEST_A).since == W0 + timedelta(hours=30)


# ---------------------------------------------------------------------------- end to end
def record_synced_state(instance: DagsterInstance, env: LocalEnvironment) -> datetime:
    """The state 200 initial syncs would leave, recorded directly (a materialization per list with
    its watermark and destination): the hour after is the subject, not the initial syncs."""
    sb = env.sandbox
    watermark = sb.clock.now_dt()
    registry = YamlClientRegistry(env.registry)
    keys = env.partition_keys()
    instance.add_dynamic_partitions(MAILCHIMP_LISTS, keys)
    for key in keys:
        client_id, list_id = parse_partition_key(key)
        record_import(instance, key, watermark, destination_of(registry.client(client_id), list_id))
    sb.clock.advance(5)
    return watermark


def evaluate_hour(instance: DagsterInstance, env: LocalEnvironment, mailchimp: MailchimpResource) -> list[RunRequest]:
    """The schedule's twelve ticks of one hour, Mailchimp's clock moving five minutes between them."""
    requests: list[RunRequest] = []
    resources = {"registry": ClientRegistryResource(path=str(env.registry)), "mailchimp": mailchimp}
    for tick in TICKS:
        context = build_schedule_context(instance=instance, scheduled_execution_time=tick, resources=resources)
        result = hourly_incremental_sync(context)
        requests += list(result) if isinstance(result, list) else []
        env.sandbox.clock.advance(300)
    return requests


def calls_per_list(env: LocalEnvironment) -> dict[str, int]:
    calls: collections.Counter[str] = collections.Counter()
    for c in env.sandbox.clients():
        for record in env.sandbox.request_log(f"mailchimp:{c.client_id}"):
            if m := re.search(r"/lists/([0-9a-f]{10})/members", record.path):
                calls[f"{c.client_id}:{m.group(1)}"] += 1
    return calls


def test_an_hour_of_200_lists_with_10_changed_runs_exactly_those_10(
    pg_instance: DagsterInstance, tmp_path: Path
) -> None:
    """On PostgreSQL, as deployed (SQLite writes a runless event in ~60 ms, PostgreSQL in a few)."""
    instance = pg_instance
    job = defs.resolve_job_def(SYNC_JOB)  # before the schedule's contexts: they leave a stale instance behind
    config = SandboxConfig.generated(clients=20, lists_per_client=10, members=[20, 35, 50])
    with sandbox_environment(config, tmp_path / "work") as env:
        sb = env.sandbox
        initial = record_synced_state(instance, env)
        keys = env.partition_keys()
        changed = keys[3::20]  # 10 lists of 10 accounts
        for i, key in enumerate(changed):
            list_id = parse_partition_key(key)[1]
            member = sb.mailchimp_list(list_id).members(include_archived=False)[0]
            if i == 0:  # an archive alone: only the archived sweep's probe sees it
                sb.set_status(list_id, member["id"], "archived")
            else:
                sb.update_member(list_id, member["id"], merge_fields={"FNAME": f"Changed{i}"})
        sb.reset_stats()
        started = time.monotonic()
        requests = evaluate_hour(instance, env, MailchimpResource())
        hour_s = time.monotonic() - started

        assert sorted(r.partition_key for r in requests) == sorted(changed)  # run requests == 10
        assert all(r.tags["mc_pipeline/sync"] == "incremental" for r in requests)
        events = latest_events(instance)
        verified = {k for k, (_, v) in events.items() if v is not None}
        assert verified == set(keys) - set(changed)  # the other 190 carry a verification observation
        calls = calls_per_list(env)
        assert all(calls[k] == 2 for k in verified)  # the members window and the archived one, counted
        assert all(calls[k] in (1, 2) for k in changed)
        for c in sb.clients():
            stats = sb.stats(f"mailchimp:{c.client_id}")
            assert stats["peak_in_flight"] <= 10 and stats["throttled"] == 0
            assert set(stats["statuses"]) == {"200"}

        # The next window starts at the verified bound: Mailchimp's clock at the probe, minus the margin.
        registry = YamlClientRegistry(env.registry)
        for key in sorted(verified)[:5]:
            client_id, list_id = parse_partition_key(key)
            marks = latest_watermarks(instance, key, destination_of(registry.client(client_id), list_id))
            assert marks.since > initial and marks.archived_since > initial

        # The requested runs import the changes; no Ometria request for any other list.
        for r in requests:
            result = job.execute_in_process(
                instance=instance, partition_key=r.partition_key, run_config=r.run_config, tags=r.tags
            )
            assert result.success
        assert len(instance.get_runs()) == 10
        for key in keys:
            client_id, list_id = parse_partition_key(key)
            held = sb.ometria_contacts(client_id, registry.client(client_id).collection(list_id))
            assert len(held) == (1 if key in changed else 0), key
        print(f"\n200 lists, one hour of ticks evaluated in {hour_s:.1f}s")


def test_a_probe_that_fails_requests_a_run_instead(instance: DagsterInstance, tmp_path: Path) -> None:
    """A revoked key (403) and a Mailchimp answering 503 past its retries: a run each, which fails
    with the clear error and alerts; nothing is recorded as verified for them. The third client's
    lists are verified (on SQLite here: the verifications' writer threads share its one file)."""
    config = SandboxConfig.generated(clients=3, lists_per_client=2, members=20)
    with sandbox_environment(config, tmp_path / "work") as env:
        sb = env.sandbox
        record_synced_state(instance, env)
        keys = env.partition_keys()
        revoked, failing, healthy = keys[:2], keys[2:3], keys[3:]
        sb.revoke("client-1")
        sb.script_faults(parse_partition_key(failing[0])[1], ["503"] * 10)
        requests = evaluate_hour(instance, env, MailchimpResource(max_attempts=2, backoff_base_s=0.01))
        assert sorted(r.partition_key for r in requests) == sorted(revoked + failing)
        events = latest_events(instance)
        assert {k for k, (_, v) in events.items() if v is not None} == set(healthy)
