"""The Ometria client against the sandbox: the rate limit held, safe retries, auth stops at once."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from mc_pipeline.local import LocalEnvironment
from mc_pipeline.registry import YamlClientRegistry
from mc_pipeline.resources.errors import (
    OmetriaAuthError,
    OmetriaQuotaError,
    OmetriaSystemicRejection,
    OmetriaUnavailable,
)
from mc_pipeline.resources.limits import SlidingWindowLimiter
from mc_pipeline.resources.ometria import OmetriaClient, OmetriaResource, PushStats
from mc_pipeline.resources.ometria_push import FIRST_BATCHES, JUDGE_AHEAD
from mc_pipeline_tests.conftest import make_env

FAST = OmetriaResource(backoff_base_s=0.01, backoff_cap_s=0.05)


def records(start: int, n: int) -> list[dict]:
    return [
        {
            "@type": "contact",
            "@collection": "test",
            "id": f"c{i}",
            "email": f"person{i}@example.org",
            "marketing_optin": "EXPLICITLY_OPTEDIN",
        }
        for i in range(start, start + n)
    ]


def client_of(env: LocalEnvironment, resource: OmetriaResource = FAST):
    return resource.client(YamlClientRegistry(env.registry).client("client-1"))


def test_twenty_batches_stay_under_eight_per_second(tmp_path: Path) -> None:
    with make_env(tmp_path, clients=1, lists_per_client=1, members=[10]) as env:
        sb = env.sandbox
        assert sb.config.ometria.rate_per_second == 8  # the plan's limit, not small_env's raised one
        om = client_of(env)
        stats = PushStats()
        for b in range(20):
            result = om.push(orjson.dumps(records(b * 100, 100)), 100, stats)
            assert (result.accepted, result.rejected) == (100, 0)
        assert sb.stats("ometria:client-1")["throttled"] == 0
        assert stats.requests == 20 and stats.pushed == 2000
        assert len(sb.ometria_contacts("client-1", "test")) == 2000


class SimulatedClock:
    """The limiter's clock in these tests: waiting moves it, so pacing is judged exactly and at once."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def wait(self, _cond: object, seconds: float) -> None:
        self.t += seconds


def simulated_limiter(rate: float, window_s: float, **kw: float) -> tuple[SlidingWindowLimiter, SimulatedClock]:
    clock = SimulatedClock()
    return SlidingWindowLimiter(rate, window_s, now=clock.now, wait=clock.wait, **kw), clock


def test_limiter_never_admits_more_than_rate_in_a_window() -> None:
    limiter, clock = simulated_limiter(8, 0.2, margin_s=0.0)
    starts = []
    for _ in range(40):
        limiter.acquire()
        starts.append(clock.now())
    for i in range(len(starts) - 8):
        assert starts[i + 8] - starts[i] >= 0.2 - 1e-9


def test_limiter_paces_starts_evenly() -> None:
    import itertools

    limiter, clock = simulated_limiter(8, 0.2, margin_s=0.0)
    starts = []
    for _ in range(17):
        limiter.acquire()
        starts.append(clock.now())
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) == pytest.approx(0.025)  # one start every 0.2 / 8 s, never a burst of 8
    assert starts[-1] - starts[0] == pytest.approx(0.4)  # and still the full rate


def test_limiter_holds_every_caller_back_after_a_429() -> None:
    limiter, clock = simulated_limiter(8, 1.0, margin_s=0.0)
    limiter.acquire()
    limiter.penalise(2.0)  # Retry-After: 2
    limiter.acquire()
    assert clock.now() >= 2.0


def test_limiter_margin_widens_after_a_429_and_decays_back() -> None:
    limiter, _ = simulated_limiter(100, 0.4, margin_s=0.01, decay=0.99)
    assert limiter.window == pytest.approx(0.41)
    limiter.penalise(0.0)
    limiter.penalise(0.0)
    widened = limiter.margin
    assert widened == pytest.approx(0.06)  # 0.01 -> 0.03 -> 0.06
    assert limiter.window == pytest.approx(0.46)
    for _ in range(5):
        limiter.penalise(0.0)
    assert limiter.margin == pytest.approx(0.1)  # capped at a quarter of the window
    for _ in range(300):
        limiter.acquire()
    assert limiter.margin == pytest.approx(0.01)  # back to the floor on a quiet line


def test_lost_answers_and_server_errors_are_retried_without_duplicates(small_env: LocalEnvironment) -> None:
    sb = small_env.sandbox
    sb.script_faults("client-1", ["store_then_drop", "500", "drop", "429"])
    stats = PushStats()
    result = client_of(small_env).push(orjson.dumps(records(0, 50)), 50, stats)
    assert result.accepted == 50
    assert stats.retries == 4 and stats.throttled == 1
    assert len(sb.ometria_contacts("client-1", "test")) == 50  # stored twice, held once
    assert sb.ometria_writes("client-1") == 100


def test_a_bad_key_stops_at_once(small_env: LocalEnvironment, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MC_SANDBOX_CLIENT_1_OMETRIA_KEY", "wrong-key-value")
    with pytest.raises(OmetriaAuthError, match="Ometria client 'client-1': 401"):
        client_of(small_env).push(orjson.dumps(records(0, 1)), 1, PushStats())
    assert "wrong-key-value" not in str(small_env.sandbox.stats())
    assert small_env.sandbox.stats("ometria:<unknown>")["requests"] == 1


def test_persistent_5xx_give_up_with_a_clear_error(small_env: LocalEnvironment) -> None:
    small_env.sandbox.script_faults("client-1", ["503"] * 10)
    with pytest.raises(OmetriaUnavailable, match="gave up after 3 attempts; last cause: 503"):
        client_of(small_env, OmetriaResource(max_attempts=3, backoff_base_s=0.01)).push(
            orjson.dumps(records(0, 1)), 1, PushStats()
        )


def test_batches_over_one_hundred_are_refused_locally(small_env: LocalEnvironment) -> None:
    with pytest.raises(ValueError, match="at most 100"):
        client_of(small_env).push(b"[]", 101, PushStats())


# ------------------------------------------------------------------------------------------ push_batches
def test_a_request_refused_as_a_whole_without_naming_a_record_is_halved_within_the_budget(
    small_env: LocalEnvironment,
) -> None:
    """A record of the wrong @type (a mapping bug) makes Ometria refuse its whole request, without
    saying which record: the request is halved down to it; the other 99 arrive."""
    sb = small_env.sandbox
    batch = records(0, 100)
    batch[37] = {"@type": "order", "@collection": "test", "id": "o1", "status": "complete"}
    stats = PushStats()
    outcome = client_of(small_env).push_batches([batch], stats)
    assert [(r.batch, r.position) for r in outcome.refused] == [(0, 37)]
    assert "@type" in outcome.refused[0].reason  # the last half of one is refused record by record
    assert len(sb.ometria_contacts("client-1", "test")) == 99
    assert stats.resent <= 14  # one halving: 2 requests per level, 7 levels


def test_isolating_beyond_the_budget_is_one_systemic_failure(small_env: LocalEnvironment) -> None:
    """Every other record of the wrong type: halving would cost hundreds of requests; it stops at
    the budget with one failure naming Ometria's reason."""
    sb = small_env.sandbox
    batch = [
        r if i % 2 else {"@type": "order", "@collection": "test", "id": f"o{i}"} for i, r in enumerate(records(0, 100))
    ]
    with pytest.raises(OmetriaSystemicRejection, match=r"client 'client-1'.*more than 14 extra requests.*mixed @type"):
        client_of(small_env).push_batches([batch], PushStats(), list_id="0123456789")
    assert sb.stats("ometria:client-1")["requests"] <= 1 + 15


def test_a_refusal_stops_the_threads_waiting_to_retry(small_env: LocalEnvironment) -> None:
    """Two batches wait out a 500's backoff when the third gets a 402: neither is sent again."""
    sb = small_env.sandbox
    sb.script_faults("client-1", ["500", "500", "402"])
    slow_retries = OmetriaResource(backoff_base_s=1.0, backoff_cap_s=1.0)
    with pytest.raises(OmetriaQuotaError, match="402"):
        client_of(small_env, slow_retries).push_batches([records(b * 100, 100) for b in range(12)], PushStats())
    assert sb.stats("ometria:client-1")["requests"] == 3
    assert sb.ometria_contacts("client-1") == {}


class Witness:
    """The client's pushes and errors lookups, in the order they happened. `hold` makes the call that
    notes one event wait (at most 5 s) for another that only an overlapping call can bring, so the
    order is judged, not timing: ("push", 4) is the 4th push sent, ("lookup", 50) a lookup of 50 ids."""

    def __init__(self, om: OmetriaClient, hold: dict[tuple[str, int], tuple[str, int]]) -> None:
        self.events: list[tuple[str, int]] = []  # ("push" | "pushed", ordinal), ("lookup" | "looked up", ids)
        self.held: list[bool] = []  # per hold: whether what it waited for came
        self.changed = threading.Condition()
        self.hold = hold
        push, errors_of = om.push, om.errors_of

        def traced_push(body: bytes, n: int, stats: PushStats, **kw: Any) -> Any:
            self.note("push")
            out = push(body, n, stats, **kw)
            self.note("pushed")
            return out

        def traced_errors_of(request_ids: list[str], stats: PushStats, **kw: Any) -> list[dict]:
            self.note("lookup", len(request_ids))
            out = errors_of(request_ids, stats, **kw)
            self.note("looked up", len(request_ids))
            return out

        om.push, om.errors_of = traced_push, traced_errors_of  # type: ignore[method-assign]

    def note(self, kind: str, n: int | None = None) -> None:
        with self.changed:
            event = (kind, n if n is not None else 1 + sum(1 for k, _ in self.events if k == kind))
            self.events.append(event)
            self.changed.notify_all()
            if event in self.hold:
                self.held.append(self.changed.wait_for(lambda: self.hold[event] in self.events, timeout=5))

    def at(self, event: tuple[str, int]) -> int:
        with self.changed:
            return self.events.index(event)


def test_errors_are_looked_up_while_later_batches_push(small_env: LocalEnvironment) -> None:
    """Benchmark 2a: the errors of every 50 answered requests are looked up at once, on the data
    API's limiter, while the next batches push; not all of them after the last push (which waits
    here for a lookup of 50 to start). Late rejections are still tied to their own records."""
    small_env.sandbox.state.config.ometria.late_reject_email_pattern = r"^person(150|5020|11999)@"
    om = client_of(small_env)
    witness = Witness(om, {("push", 120): ("lookup", 50)})
    stats = PushStats()
    outcome = om.push_batches([records(b * 100, 100) for b in range(120)], stats)
    assert witness.held == [True]  # a lookup of 50 started before the last push was sent
    lookups = [n for kind, n in witness.events if kind == "lookup"]
    assert lookups == [3, 50, 50, 17]  # the first 3 batches' judgement, two of 50 while pushing, the rest
    assert witness.at(("lookup", 50)) < witness.at(("pushed", 120))
    assert [(r.batch, r.position) for r in outcome.refused] == [(1, 50), (50, 20), (119, 99)]
    assert stats.failed_after_answer == 3 and stats.lookups == 4 and stats.requests == 120


def test_the_first_batches_are_judged_while_the_next_ones_push(small_env: LocalEnvironment) -> None:
    """The judgement of the first 3 batches (one lookup) does not stall the push: the 4th batch is
    sent while it is under way (the lookup waits here for it); a push beyond `JUDGE_AHEAD` more waits
    for the judgement."""
    om = client_of(small_env)
    witness = Witness(om, {("lookup", 3): ("push", 4)})
    outcome = om.push_batches([records(b * 100, 100) for b in range(12)], PushStats())
    assert witness.held == [True] and outcome.refused == []
    judged = witness.at(("looked up", 3))
    assert witness.at(("push", 4)) < judged < witness.at(("push", FIRST_BATCHES + JUDGE_AHEAD + 1))
