"""Change-aware incremental syncs: slots in the hour, probes of Mailchimp, verifications in Dagster.

The end-to-end test is the issue's CI-size proof: 200 lists (20 accounts x 10), 10 changed, the
schedule's twelve ticks of one hour evaluated against a real instance and the sandbox, then the
requested runs executed: exactly the 10 changed lists imported, the 190 others verified, no run.
"""

from __future__ import annotations

import collections
import itertools
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import (
    AssetObservation,
    AssetRecordsFilter,
    DagsterInstance,
    DagsterRunStatus,
    RunRequest,
    build_schedule_context,
)
from dagster._core.test_utils import create_run_for_test
from sqlalchemy import event
from sqlalchemy.pool import Pool

from mc_pipeline.assets import watermarks
from mc_pipeline.assets.keys import CONTACTS_KEY
from mc_pipeline.assets.models import Destination
from mc_pipeline.assets.watermarks import (
    VERIFIED_AT,
    WATERMARK,
    destination_of,
    latest_events,
    latest_watermarks,
    record_import,
    record_imports,
    verification_metadata,
)
from mc_pipeline.automation.checks import dead_letter_state, last_imports
from mc_pipeline.automation.probes import Cadence, evaluate_tick
from mc_pipeline.automation.schedules import hourly_incremental_sync
from mc_pipeline.dead_letters import OUTSTANDING
from mc_pipeline.definitions import defs
from mc_pipeline.jobs import SYNC_JOB
from mc_pipeline.local import LocalEnvironment, patched_environ, sandbox_environment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import YamlClientRegistry, parse_partition_key
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.sandbox import SandboxConfig
from mc_pipeline.sandbox.clock import SandboxClock
from mc_pipeline.tags import MAILCHIMP_ACCOUNT

HOUR = datetime(2026, 11, 23, 14, 0, tzinfo=UTC)
TICKS = [HOUR + timedelta(minutes=5 * i) for i in range(10)]  # one probe cycle: 50 minutes


# ---------------------------------------------------------------------------- slots
def test_each_list_has_one_stable_slot_per_cycle_and_the_cycle_is_spread_evenly() -> None:
    cadence = Cadence()
    assert cadence.cron == "*/5 * * * *" and cadence.cycle_s == 50 * 60
    keys = [f"client-{i % 2000}:{i:010x}" for i in range(10_000)]
    per_tick = collections.Counter()
    for key in keys:
        due = [t for t in TICKS if cadence.slot_in_tick(key, t) is not None]
        assert len(due) == 1, key  # every list probed once in each cycle, exactly once
        slot = cadence.slot_in_tick(key, due[0])
        assert due[0] <= slot < due[0] + timedelta(minutes=5)
        later = due[0] + timedelta(seconds=7 * cadence.cycle_s)
        assert Cadence().slot_in_tick(key, later) == slot + timedelta(seconds=7 * cadence.cycle_s)  # stable
        per_tick[due[0]] += 1
    assert max(per_tick.values()) < 1.1 * 10_000 / 10 and min(per_tick.values()) > 0.9 * 10_000 / 10
    # Within a tick, slots spread too: the first and the second half of each tick hold about half each.
    firsts = sum(1 for k in keys for t in TICKS if (s := cadence.slot_in_tick(k, t)) and s < t + timedelta(seconds=150))
    assert 0.45 < firsts / len(keys) < 0.55


def test_the_cycle_leaves_two_ticks_of_the_promise_for_a_deferral_and_the_lag() -> None:
    """Staleness by construction: probes a cycle apart, or a cycle and a tick when the probe was
    deferred, leave at least a tick of the promise for the answer or the import."""
    for every, tick in ((3600, 300), (300, 60), (1800, 600), (3600, 1200)):
        cadence = Cadence(every_s=every, tick_s=tick)
        ticks = [HOUR + timedelta(seconds=tick * i) for i in range(4 * every // tick)]
        for key in (f"client-{i}:{i:010x}" for i in range(300)):
            probed = [t for t in ticks if cadence.slot_in_tick(key, t) is not None]
            gaps = {b - a for a, b in itertools.pairwise(probed)}
            assert gaps == {timedelta(seconds=cadence.cycle_s)}, key
            deferred = cadence.cycle_s + tick  # its slot's tick deferred it; the next one takes it
            assert all(cadence.deferred_slot(key, t + timedelta(seconds=tick)) for t in probed)
            assert deferred + tick <= every
    with pytest.raises(ValueError, match="must divide"):
        Cadence(every_s=120, tick_s=60)  # no room for a deferral and the lag


def test_near_real_time_cadence_verifies_every_list_within_five_minutes() -> None:
    cadence = Cadence(every_s=300, tick_s=60)
    assert cadence.cron == "*/1 * * * *" and cadence.cycle_s == 180
    minutes = [HOUR + timedelta(minutes=i) for i in range(60)]
    for key in (f"client-1:{i:010x}" for i in range(200)):
        assert len([m for m in minutes if cadence.slot_in_tick(key, m)]) == 20
    with pytest.raises(ValueError, match="must divide"):
        Cadence(every_s=7 * 60, tick_s=60)
    with pytest.raises(ValueError, match="must divide"):
        Cadence(every_s=600, tick_s=240)
    with patched_environ({"MC_PIPELINE_VERIFY_EVERY_MIN": "5", "MC_PIPELINE_PROBE_TICK_MIN": ""}):
        assert Cadence.from_env() == cadence  # the setting: within every 5 minutes, ticking each minute
    override = Cadence(cron_override="* * * * *")  # demos and benchmarks: every tick takes every list
    assert override.cron == "* * * * *" and override.slot_in_tick("client-1:0123456789", HOUR) == HOUR
    assert override.deferred_slot("client-1:0123456789", HOUR) is None


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
    """The schedule's ten ticks of one probe cycle, Mailchimp's clock moving five minutes between them."""
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
        started, sessions = time.monotonic(), collections.Counter()

        def opened(*_: object) -> None:  # a new database session: Dagster's storages use NullPool
            sessions["opened"] += 1

        event.listen(Pool, "connect", opened)
        try:
            requests = evaluate_hour(instance, env, MailchimpResource())
        finally:
            event.remove(Pool, "connect", opened)
        hour_s = time.monotonic() - started
        # The watermarks of a tick's lists in a few reads, its verifications in one batch: about 20
        # sessions a tick whatever its lists (6 of them the instance each context rehydrates), not
        # 2 more a list (each `report_runless_asset_event`: 63 a tick of 19 lists before).
        assert sessions["opened"] <= 25 * len(TICKS), sessions

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
        print(f"\n200 lists, one cycle of ticks evaluated in {hour_s:.1f}s, {sessions['opened']} database sessions")


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


# ---------------------------------------------------------------------------- an account syncing
class SandboxTime:
    """`time` for the records' timestamps: the sandbox's clock, which the simulated ticks follow."""

    def __init__(self, clock: SandboxClock) -> None:
        self.clock = clock

    def time(self) -> float:
        return self.clock.now()

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def test_a_list_whose_account_is_syncing_waits_a_tick_for_its_probe_not_a_run(
    instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of the account in another process has the account's connections, so a probe at the
    same time could pass them: the list is probed at the next tick instead, with no run; a run,
    queued behind, only if the account is still syncing then. Two cycles of ticks, the sandbox's
    clock following them: every list probed has watermarks at most a cycle and a tick apart (the
    promise less a tick, left for the lag)."""
    config = SandboxConfig.generated(clients=2, lists_per_client=6, members=20)
    cadence = Cadence()
    with sandbox_environment(config, tmp_path / "work") as env:
        sb = env.sandbox
        monkeypatch.setattr(watermarks, "time", SandboxTime(sb.clock))
        tick_s, cycle = cadence.tick_s, timedelta(seconds=cadence.cycle_s)
        start = datetime.fromtimestamp((sb.clock.now_s() // tick_s + 1) * tick_s, UTC)
        ticks = [start + timedelta(seconds=tick_s * i) for i in range(2 * cadence.cycle_s // tick_s + 2)]
        registry = YamlClientRegistry(env.registry)
        keys = env.partition_keys()
        instance.add_dynamic_partitions(MAILCHIMP_LISTS, keys)
        imports = {
            k: (sb.clock.now_dt(), destination_of(registry.client(k.split(":")[0]), k.split(":")[1])) for k in keys
        }
        # Recorded as of the tick before the first, as if that tick had verified them: otherwise the
        # first tick takes the lists of the one before it as deferred (a schedule just started).
        record_imports(instance, imports, at=(start - timedelta(seconds=tick_s)).timestamp())
        slot_tick = {k: next(t for t in ticks if cadence.slot_in_tick(k, t)) for k in keys}
        mine = [k for k in keys if k.startswith("client-1:")]
        once, twice = next(
            (a, b)
            for a in mine
            for b in mine
            if slot_tick[a] not in (slot_tick[b], slot_tick[b] + timedelta(seconds=tick_s))
            and slot_tick[a] + timedelta(seconds=tick_s) != slot_tick[b]
            and slot_tick[b] + timedelta(seconds=tick_s) < start + cycle  # all in the first cycle
        )
        step = timedelta(seconds=tick_s)
        busy_ticks = {slot_tick[once], slot_tick[twice], slot_tick[twice] + step}
        # What each list of client-1 should meet in the first cycle: probed at its tick, at the next, or a run.
        expected_runs = {k for k in mine if slot_tick[k] in busy_ticks and slot_tick[k] + step in busy_ticks}
        expected_late = {k for k in mine if slot_tick[k] in busy_ticks} - expected_runs
        assert once in expected_late and twice in expected_runs
        resources = {"registry": ClientRegistryResource(path=str(env.registry)), "mailchimp": MailchimpResource()}
        requests, deferred, run = [], set(), None
        for tick in ticks:
            if tick in busy_ticks and run is None:
                tags = {MAILCHIMP_ACCOUNT: "client-1"}  # another list's sync of the account
                run = create_run_for_test(instance, job_name=SYNC_JOB, status=DagsterRunStatus.STARTED, tags=tags)
            elif tick not in busy_ticks and run is not None:
                instance.report_run_failed(run)
                run = None
            sb.clock.set(tick + timedelta(seconds=1))
            context = build_schedule_context(instance=instance, scheduled_execution_time=tick, resources=resources)
            result, report = evaluate_tick(context, resources["registry"], resources["mailchimp"], cadence)
            requests += list(result) if isinstance(result, list) else []
            deferred |= set(report.deferred)
        assert deferred == expected_late | expected_runs
        assert sorted(r.partition_key for r in requests) == sorted(expected_runs)  # unchanged lists: no run
        for r in requests:  # the run key of its slot's period: asked for twice, one run
            assert r.run_key.endswith(f"{cadence.slot_in_tick(r.partition_key, slot_tick[r.partition_key]):%H:%M:%S}")
        probes = {k: sum(1 for t in ticks if cadence.slot_in_tick(k, t)) - (k in expected_runs) for k in keys}
        assert calls_per_list(env) == {k: 2 * n for k, n in probes.items()}  # none while its account syncs
        for key in set(keys) - expected_runs:
            where = AssetRecordsFilter(asset_key=CONTACTS_KEY, asset_partitions=[key])
            marks = [
                imports[key][0],
                *sorted(
                    datetime.fromtimestamp(r.asset_observation.metadata[WATERMARK].value, UTC)
                    for r in instance.fetch_observations(where, limit=100).records
                ),
            ]
            assert len(marks) == 1 + probes[key], key  # verified once in each cycle
            gaps = [b - a for a, b in itertools.pairwise(marks)]
            assert max(gaps) <= cycle + step, key  # a tick of the promise left for the answer or the import
            # Its first probe at its tick, or a tick later when deferred: a cycle and a tick after the
            # probe of the cycle before at most (the watermark is Mailchimp's clock less 2 s).
            first = slot_tick[key] + (step if key in expected_late else timedelta(0))
            assert first - timedelta(seconds=2) <= marks[1] <= first, key
