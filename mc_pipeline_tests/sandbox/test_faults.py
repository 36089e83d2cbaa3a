"""Fault injection on the Mailchimp side: scripted per server and per list, and seeded rates."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import requests

from mc_pipeline.sandbox import AccountSpec, Faults, ListSpec, Sandbox, SandboxConfig
from mc_pipeline_tests.sandbox.wire import assert_problem, contact, mc_get, om_push, wait_for

GATEWAY_DELAY_S = 0.15
SLOW_DELAY_S = 3.0


@pytest.fixture(scope="module")
def fsb() -> Iterator[Sandbox]:
    config = SandboxConfig.generated(
        lists_per_client=2,
        members=[40, 30],
        mailchimp={"faults": {"gateway_delay_s": GATEWAY_DELAY_S, "slow_delay_s": SLOW_DELAY_S}},
    )
    with Sandbox(config) as sandbox:
        yield sandbox


@pytest.fixture(autouse=True)
def no_leftover_faults(fsb: Sandbox) -> Iterator[None]:
    yield
    fsb.state.faults.clear()
    # A request the client has fully read may still be finishing on the server: let it, then reset.
    wait_for(lambda: fsb.stats("mailchimp:client-1")["in_flight"] == 0)
    fsb.reset_stats()


@pytest.fixture
def lists(fsb: Sandbox) -> tuple[str, str]:
    a, b = fsb.client("client-1").list_ids
    return a, b


def get_members(sb: Sandbox, list_id: str, client_id: str = "client-1", **kwargs: object) -> requests.Response:
    return mc_get(sb, f"/lists/{list_id}/members", client_id, params={"count": 20}, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["500", "503", "429"])
def test_scripted_error_statuses_are_problem_json(fsb: Sandbox, lists: tuple[str, str], kind: str) -> None:
    fsb.script_faults(lists[0], [kind])
    assert_problem(get_members(fsb, lists[0]), int(kind))
    assert get_members(fsb, lists[0]).status_code == 200  # one fault per scripted entry


@pytest.mark.parametrize("target", ["mailchimp", "list"])
def test_504_after_the_gateway_delay(fsb: Sandbox, lists: tuple[str, str], target: str) -> None:
    """A list-scripted fault uses the server's delays when the list has none of its own."""
    fsb.script_faults(lists[0] if target == "list" else "mailchimp", ["504"])
    started = time.perf_counter()
    r = get_members(fsb, lists[0])
    elapsed = time.perf_counter() - started
    assert r.status_code == 504
    assert r.headers["Content-Type"].startswith("text/html")
    assert GATEWAY_DELAY_S * 0.95 <= elapsed < GATEWAY_DELAY_S + 0.5


def test_504_delay_from_the_lists_own_settings(fsb: Sandbox, lists: tuple[str, str]) -> None:
    fsb.set_fault_rates(lists[0], Faults(gateway_timeout_rate=1.0, gateway_delay_s=0.35))
    started = time.perf_counter()
    assert get_members(fsb, lists[0]).status_code == 504
    assert time.perf_counter() - started >= 0.35 * 0.95  # its own delay, not the server's 0.15 s


def test_dropped_connection(fsb: Sandbox, lists: tuple[str, str]) -> None:
    fsb.script_faults(lists[0], ["drop"])
    with pytest.raises(requests.exceptions.ConnectionError):
        get_members(fsb, lists[0])
    assert get_members(fsb, lists[0]).status_code == 200
    dropped = [rec for rec in fsb.request_log("mailchimp:client-1") if rec.fault == "drop"]
    assert dropped and dropped[-1].status == 0


def test_truncated_json(fsb: Sandbox, lists: tuple[str, str]) -> None:
    full = get_members(fsb, lists[0])
    fsb.script_faults(lists[0], ["truncate"])
    cut = get_members(fsb, lists[0])
    assert cut.status_code == 200
    assert int(cut.headers["Content-Length"]) == len(cut.content) == len(full.content) // 2
    assert full.content.startswith(cut.content)
    with pytest.raises(ValueError):
        cut.json()


def test_slow_answer_beyond_the_client_timeout(fsb: Sandbox, lists: tuple[str, str]) -> None:
    fsb.script_faults(lists[0], ["slow"])
    started = time.perf_counter()
    with pytest.raises(requests.exceptions.ReadTimeout):
        get_members(fsb, lists[0], timeout=0.25)
    assert time.perf_counter() - started < SLOW_DELAY_S
    # The abandoned request is counted (status 0) and frees its slot when the client hangs up,
    # not after the slow delay.
    wait_for(lambda: any(rec.fault == "slow" for rec in fsb.request_log("mailchimp:client-1")), 2.0)
    [rec] = [rec for rec in fsb.request_log("mailchimp:client-1") if rec.fault == "slow"]
    assert rec.status == 0
    wait_for(lambda: fsb.stats("mailchimp:client-1")["in_flight"] == 0, 1.0)
    assert time.perf_counter() - started < SLOW_DELAY_S
    assert get_members(fsb, lists[0]).status_code == 200


def test_bare_403_throttle_with_html(fsb: Sandbox, lists: tuple[str, str]) -> None:
    fsb.script_faults(lists[0], ["403_throttle"])
    r = get_members(fsb, lists[0])
    assert r.status_code == 403
    assert r.headers["Content-Type"].startswith("text/html")
    assert b"Access Denied" in r.content
    with pytest.raises(ValueError):
        r.json()


def test_list_faults_do_not_touch_another_list(fsb: Sandbox, lists: tuple[str, str]) -> None:
    faulty, healthy = lists
    fsb.script_faults(faulty, ["500", "503", "drop"])
    assert [get_members(fsb, healthy).status_code for _ in range(3)] == [200, 200, 200]
    assert mc_get(fsb, "/lists").status_code == 200
    assert get_members(fsb, faulty).status_code == 500
    assert get_members(fsb, faulty).status_code == 503
    with pytest.raises(requests.exceptions.ConnectionError):
        get_members(fsb, faulty)
    assert get_members(fsb, faulty).status_code == 200


def test_list_faults_cover_the_lists_endpoints(fsb: Sandbox, lists: tuple[str, str]) -> None:
    member = fsb.mailchimp_list(lists[0]).members()[0]["id"]
    fsb.script_faults(lists[0], ["500", "503"])
    assert mc_get(fsb, f"/lists/{lists[0]}").status_code == 500
    assert mc_get(fsb, f"/lists/{lists[0]}/members/{member}").status_code == 503


def test_server_wide_script_hits_any_endpoint(fsb: Sandbox, lists: tuple[str, str]) -> None:
    fsb.script_faults("mailchimp", ["503", "500"])
    assert mc_get(fsb, "/lists").status_code == 503
    assert get_members(fsb, lists[1]).status_code == 500
    assert mc_get(fsb, "/lists").status_code == 200


def test_refused_requests_do_not_consume_scripted_faults(fsb: Sandbox, lists: tuple[str, str]) -> None:
    fsb.script_faults(lists[0], ["500"])
    assert get_members(fsb, lists[0], auth=("x", "f" * 32 + "-us6")).status_code == 401
    assert get_members(fsb, lists[0]).status_code == 500


def test_error_rate_fails_about_half(fsb: Sandbox, lists: tuple[str, str]) -> None:
    fsb.set_fault_rates(lists[0], Faults(error_rate=0.5))
    session = requests.Session()
    key = fsb.client("client-1").mailchimp_key
    codes = [
        session.get(
            f"{fsb.mailchimp_url}/lists/{lists[0]}/members",
            params={"count": 1, "fields": "total_items"},
            auth=("x", key),
            timeout=5,
        ).status_code
        for _ in range(200)
    ]
    failed = [c for c in codes if c != 200]
    assert 60 <= len(failed) <= 140
    assert set(failed) == {500, 503}
    # The other list has no rates.
    assert get_members(fsb, lists[1]).status_code == 200


@pytest.mark.parametrize(
    ("rates", "check"),
    [
        (Faults(drop_rate=1.0), "drop"),
        (Faults(truncate_rate=1.0), "truncate"),
        (Faults(gateway_timeout_rate=1.0, gateway_delay_s=0.05), "504"),
    ],
)
def test_rates_by_kind(fsb: Sandbox, lists: tuple[str, str], rates: Faults, check: str) -> None:
    fsb.set_fault_rates(lists[0], rates)
    for _ in range(3):
        if check == "drop":
            with pytest.raises(requests.exceptions.ConnectionError):
                get_members(fsb, lists[0])
        elif check == "truncate":
            r = get_members(fsb, lists[0])
            assert r.status_code == 200
            with pytest.raises(ValueError):
                r.json()
        else:
            assert get_members(fsb, lists[0]).status_code == 504


def test_faults_from_the_config(make_sandbox: Callable[..., Sandbox]) -> None:
    """Per-list rates in ListSpec, and server-wide rates that leave the other server alone."""
    config = SandboxConfig(
        accounts=[
            AccountSpec(
                client_id="acme",
                lists=[ListSpec(members=20, faults=Faults(error_rate=1.0)), ListSpec(members=20)],
            )
        ],
        ometria={"faults": {"error_rate": 1.0}},
    )
    sb = make_sandbox(config)
    broken, fine = sb.client("acme").list_ids
    assert {get_members(sb, broken, "acme").status_code for _ in range(10)} <= {500, 503}
    assert {get_members(sb, fine, "acme").status_code for _ in range(10)} == {200}
    assert sb.state.faults.injected.get("500", 0) + sb.state.faults.injected.get("503", 0) == 10
    assert om_push(sb, [contact("c1")], "acme").status_code in (500, 503)
    assert sb.ometria_contacts("acme") == {}


def test_unknown_fault_kind_is_refused(fsb: Sandbox) -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        fsb.script_faults("mailchimp", ["500", "fire"])
    assert fsb.state.faults.pending("mailchimp") == 0
