"""Mailchimp's limits and latency model: 10 requests in flight per key, base + per-KiB latency."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from mc_pipeline.sandbox import Latency, Sandbox, SandboxConfig
from mc_pipeline_tests.sandbox.wire import TIMEOUT, assert_problem, wait_for

LATENCY_S = 0.3


@pytest.fixture
def slow_sb(make_sandbox: Callable[..., Sandbox]) -> Sandbox:
    """Every Mailchimp answer takes 300 ms, so concurrent requests overlap for sure."""
    config = SandboxConfig.generated(
        clients=2, lists_per_client=1, members=50, mailchimp={"latency": {"base_ms": LATENCY_S * 1000}}
    )
    return make_sandbox(config)


def timed_get(sb: Sandbox, client_id: str, barrier: threading.Barrier | None = None) -> tuple[requests.Response, float]:
    c = sb.client(client_id)
    if barrier is not None:
        barrier.wait()
    started = time.perf_counter()
    r = requests.get(
        f"{sb.mailchimp_url}/lists/{c.list_ids[0]}/members",
        params={"count": 1},
        auth=("x", c.mailchimp_key),
        timeout=TIMEOUT,
    )
    return r, time.perf_counter() - started


def test_eleventh_request_in_flight_is_429_at_once(slow_sb: Sandbox) -> None:
    barrier = threading.Barrier(15)
    with ThreadPoolExecutor(15) as pool:
        results = list(pool.map(lambda _: timed_get(slow_sb, "client-1", barrier), range(15)))
    ok = [t for r, t in results if r.status_code == 200]
    throttled = [(r, t) for r, t in results if r.status_code == 429]
    assert len(ok) == 10
    assert len(throttled) == 5
    for r, _ in throttled:
        assert_problem(r, 429, "Too Many Requests")
    # The 429s do not wait for the latency; the served requests do.
    assert min(ok) >= LATENCY_S * 0.95
    assert max(t for _, t in throttled) < min(0.2, min(ok) / 2)
    stats = slow_sb.stats("mailchimp:client-1")
    assert stats["peak_in_flight"] == 10
    assert stats["throttled"] == 5
    assert stats["statuses"] == {"200": 10, "429": 5}
    wait_for(lambda: slow_sb.stats("mailchimp:client-1")["in_flight"] == 0)


def test_a_slot_frees_when_a_request_ends(slow_sb: Sandbox) -> None:
    """Ten at a time, not ten in total: after the first wave, the next ten are served again."""
    barrier = threading.Barrier(10)
    with ThreadPoolExecutor(10) as pool:
        for _ in range(2):
            codes = [r.status_code for r, _ in pool.map(lambda _: timed_get(slow_sb, "client-1", barrier), range(10))]
            assert codes == [200] * 10
    assert slow_sb.stats("mailchimp:client-1")["throttled"] == 0


def test_another_key_is_not_affected(slow_sb: Sandbox) -> None:
    with ThreadPoolExecutor(10) as pool:
        busy = [pool.submit(timed_get, slow_sb, "client-1") for _ in range(10)]
        wait_for(lambda: slow_sb.stats("mailchimp:client-1")["in_flight"] == 10)
        eleventh, _ = timed_get(slow_sb, "client-1")
        assert eleventh.status_code == 429  # client-1 is saturated...
        other, elapsed = timed_get(slow_sb, "client-2")
        assert other.status_code == 200  # ...client-2 is served normally, not refused
        assert elapsed >= LATENCY_S * 0.95
        assert [f.result()[0].status_code for f in busy] == [200] * 10
    assert slow_sb.stats("mailchimp:client-2")["throttled"] == 0
    assert slow_sb.stats("mailchimp:client-2")["peak_in_flight"] == 1


def test_per_kib_latency_makes_fewer_fields_faster(make_sandbox: Callable[..., Sandbox]) -> None:
    base_ms, per_kb_ms = 40.0, 0.5
    config = SandboxConfig.generated(
        lists_per_client=1, members=300, mailchimp={"latency": {"base_ms": base_ms, "per_kb_ms": per_kb_ms}}
    )
    sb = make_sandbox(config)
    c = sb.client("client-1")

    def fetch(**params: object) -> tuple[int, float]:
        started = time.perf_counter()
        r = requests.get(
            f"{sb.mailchimp_url}/lists/{c.list_ids[0]}/members",
            params={"count": 150, **params},
            auth=("x", c.mailchimp_key),
            timeout=TIMEOUT,
        )
        assert r.status_code == 200
        return len(r.content), time.perf_counter() - started

    full_bytes, full_s = fetch()
    slim_bytes, slim_s = fetch(fields="members.id,members.email_address,total_items")
    assert full_bytes > 20 * slim_bytes
    expected_full = (base_ms + per_kb_ms * full_bytes / 1024) / 1000
    assert full_s >= expected_full * 0.95
    assert slim_s >= base_ms / 1000 * 0.95
    assert slim_s < full_s / 2


def test_latency_formula() -> None:
    lat = Latency(base_ms=10, per_kb_ms=2, jitter_ms=4)
    assert lat.seconds(2048, 0.5) == pytest.approx((10 + 2 * 2 + 4 * 0.5) / 1000)
    assert Latency().seconds(10**6, 0.9) == 0


def test_the_sandboxs_own_work_is_inside_the_modelled_latency() -> None:
    from mc_pipeline.sandbox.middlewares import sleep_time as _sleep_time

    lat = Latency(base_ms=250, per_kb_ms=0.15)
    modelled = lat.seconds(600 * 1024, 0.0)
    state = None  # only read for jitter
    assert _sleep_time(lat, 600 * 1024, state, spent=0.0) == pytest.approx(modelled)  # type: ignore[arg-type]
    assert _sleep_time(lat, 600 * 1024, state, spent=0.02) == pytest.approx(modelled - 0.02)  # type: ignore[arg-type]
    assert _sleep_time(lat, 600 * 1024, state, spent=5.0) == 0.0  # type: ignore[arg-type]
