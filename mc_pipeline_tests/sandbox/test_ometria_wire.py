"""The sandbox's Ometria push API on the wire: auth, batch rules, validation, upsert, limits, faults."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from mc_pipeline.sandbox import Sandbox, SandboxConfig
from mc_pipeline.sandbox.config import OmetriaSettings
from mc_pipeline.sandbox.ometria import SandboxOmetriaAccount
from mc_pipeline_tests.sandbox.wire import TIMEOUT, admin, contact, om_push, wait_for

SLOW_DELAY_S = 2.0


@pytest.fixture(scope="module")
def osb() -> Iterator[Sandbox]:
    """Rate limit lifted so that the tests here never meet it; the limits have their own sandbox."""
    config = SandboxConfig.generated(
        clients=2,
        lists_per_client=1,
        members=5,
        ometria={"rate_per_second": 10_000, "faults": {"slow_delay_s": SLOW_DELAY_S, "gateway_delay_s": 0.1}},
    )
    with Sandbox(config) as sandbox:
        yield sandbox


@pytest.fixture(autouse=True)
def clean_state(osb: Sandbox) -> Iterator[None]:
    yield
    osb.state.faults.clear()
    # A request the client has fully read may still be finishing on the server: let it, then reset.
    wait_for(lambda: all(osb.stats(f"ometria:{c}")["in_flight"] == 0 for c in ("client-1", "client-2")))
    osb.reset_stats()
    for client in ("client-1", "client-2"):
        osb.revoke(client, "ometria", revoked=False)
        osb.state.om_by_client[client].reset()


def ok(r: requests.Response, accepted: int, rejected: int = 0) -> dict[str, Any]:
    assert r.status_code == 202, r.text
    body = r.json()
    assert set(body) == {"status", "request_id", "accepted", "rejected"}
    assert body["status"] == "OK"
    assert (body["accepted"], body["rejected"]) == (accepted, rejected)
    return body


def refused(r: requests.Response, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == "ERROR"
    for word in words:
        assert word.lower() in body["message"].lower(), body["message"]
    return body["message"]


def errors(sb: Sandbox, client_id: str = "client-1") -> list[dict[str, str]]:
    r = requests.get(
        f"{sb.ometria_url}/push/_errors", headers={"X-Ometria-Auth": sb.client(client_id).ometria_key}, timeout=TIMEOUT
    )
    assert r.status_code == 200
    return r.json()


# ------------------------------------------------------------------------------------------ auth
class TestAuth:
    def test_missing_key_is_401(self, osb: Sandbox) -> None:
        refused(om_push(osb, [contact("a")], key=""), 401)

    def test_unknown_key_is_401(self, osb: Sandbox) -> None:
        refused(om_push(osb, [contact("a")], key="not-a-real-key-123"), 401)

    def test_mailchimp_key_is_not_an_ometria_key(self, osb: Sandbox) -> None:
        refused(om_push(osb, [contact("a")], key=osb.client("client-1").mailchimp_key), 401)

    def test_revoked_key_is_403(self, osb: Sandbox) -> None:
        osb.revoke("client-1", "ometria")
        refused(om_push(osb, [contact("a")]), 403)
        ok(om_push(osb, [contact("a")], "client-2"), 1)
        osb.revoke("client-1", "ometria", revoked=False)
        ok(om_push(osb, [contact("a")]), 1)

    def test_refused_pushes_store_nothing(self, osb: Sandbox) -> None:
        om_push(osb, [contact("a")], key="")
        osb.revoke("client-1", "ometria")
        om_push(osb, [contact("b")])
        assert osb.ometria_contacts("client-1") == {}

    def test_errors_endpoint_needs_the_key(self, osb: Sandbox) -> None:
        r = requests.get(f"{osb.ometria_url}/push/_errors", timeout=TIMEOUT)
        assert r.status_code == 401


# ------------------------------------------------------------------------------------------ batch rules
class TestBatchRules:
    def test_100_records_is_the_limit(self, osb: Sandbox) -> None:
        ok(om_push(osb, [contact(f"c{i}") for i in range(100)]), 100)
        refused(om_push(osb, [contact(f"d{i}") for i in range(101)]), 400, "101", "100")
        assert not any(k.endswith("/d0") for k in osb.ometria_contacts("client-1"))

    def test_mixed_types_are_refused(self, osb: Sandbox) -> None:
        batch = [contact("a"), {"@type": "order", "id": "o1", "status": "complete"}]
        refused(om_push(osb, batch), 400, "mixed @type")
        assert osb.ometria_contacts("client-1") == {}

    def test_record_over_60_kib_is_refused(self, osb: Sandbox) -> None:
        big = contact("big", properties={"note": "x" * (61 * 1024)})
        assert len(json.dumps(big)) > 61 * 1024
        refused(om_push(osb, [contact("small"), big]), 400, "too large")
        assert osb.ometria_contacts("client-1") == {}
        under = contact("under", properties={"note": "x" * (59 * 1024)})
        ok(om_push(osb, [under]), 1)

    @pytest.mark.parametrize(
        ("data", "words"),
        [
            (b'{"@type": "contact", "id": "a", "email": "a@example.org"}', ("json array",)),
            (b'"contact"', ("json array",)),
            (b"[]", ("no records",)),
            (b'[{"@type": "contact", "id": "a"', ("not valid json",)),
            (b"", ("not valid json",)),
            (b"\xff\xfe garbage", ("not valid json",)),
        ],
    )
    def test_malformed_bodies_are_400(self, osb: Sandbox, data: bytes, words: tuple[str, ...]) -> None:
        refused(om_push(osb, data=data), 400, *words)


# ------------------------------------------------------------------------------------------ validation
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("empty id", {"id": ""}, ".id"),
    ("blank id", {"id": "   "}, ".id"),
    ("numeric id", {"id": 123}, ".id"),
    ("no id", {"id": None}, ".id"),
    ("email without @", {"email": "not-an-email"}, ".email"),
    ("email without dot", {"email": "a@localhost"}, ".email"),
    ("email with two @", {"email": "a@@example.org"}, ".email"),
    ("email with space", {"email": "a b@example.org"}, ".email"),
    ("email with a NUL byte", {"email": "a\x00b@example.org"}, ".email"),
    ("email with DEL", {"email": "ab@exam\x7fple.org"}, ".email"),
    ("firstname with a control character", {"firstname": "Ada\x1b"}, ".firstname"),
    ("lastname with a NUL byte", {"lastname": "Love\x00lace"}, ".lastname"),
    ("no email nor customer id", {"email": None}, ".email"),
    ("unknown opt-in", {"marketing_optin": "YES"}, ".marketing_optin"),
    ("lower-case opt-in", {"marketing_optin": "explicitly_optedin"}, ".marketing_optin"),
    ("timestamp in words", {"timestamp_subscribed": "yesterday"}, ".timestamp_subscribed"),
    ("date without time", {"timestamp_acquired": "2025-03-01"}, ".timestamp_acquired"),
    ("numeric timestamp", {"timestamp_unsubscribed": 1700000000}, ".timestamp_unsubscribed"),
    ("wrong @type", {"@type": "order"}, ".@type"),
]


class TestValidation:
    @pytest.mark.parametrize(("why", "change", "path"), INVALID, ids=[x[0] for x in INVALID])
    def test_invalid_contacts_are_rejected_one_by_one(
        self, osb: Sandbox, why: str, change: dict[str, Any], path: str
    ) -> None:
        bad = contact("bad")
        for k, v in change.items():
            if v is None:
                bad.pop(k)
            else:
                bad[k] = v
        if change.get("@type") == "order":  # one type per request: a lone wrong record
            answer = ok(om_push(osb, [bad]), 0, 1)
            expected_path = f"[0]{path}"
        else:
            answer = ok(om_push(osb, [contact("good-1"), bad, contact("good-2")]), 2, 1)
            expected_path = f"[1]{path}"
            assert set(osb.ometria_contacts("client-1", "mailchimp-test")) == {"good-1", "good-2"}
        errs = errors(osb)
        assert len(errs) == 1
        assert set(errs[0]) == {"error_message", "error_path", "request_id"}
        assert errs[0]["request_id"] == answer["request_id"]
        assert errs[0]["error_path"] == expected_path
        assert errs[0]["error_message"]

    @pytest.mark.parametrize("optin", ["EXPLICITLY_OPTEDIN", "NOT_SPECIFIED", "EXPLICITLY_OPTEDOUT"])
    def test_every_optin_value_is_accepted(self, osb: Sandbox, optin: str) -> None:
        ok(om_push(osb, [contact("o", marketing_optin=optin)]), 1)

    def test_valid_variants(self, osb: Sandbox) -> None:
        batch = [
            contact("z", timestamp_subscribed="2025-03-01T10:00:00Z"),
            contact("offset", timestamp_acquired="2025-03-01T10:00:00.123+05:30"),
            contact("plus", email="Mixed.Case+tag@Example.co.uk"),
            contact("unicode", email="josé@exämple.org", firstname="Zoë", lastname="佐藤"),
            {"@type": "contact", "@collection": "mailchimp-test", "id": "cust", "customer_id": "c-1"},
        ]
        ok(om_push(osb, batch), 5)
        assert errors(osb) == []

    def test_request_ids_are_unique(self, osb: Sandbox) -> None:
        ids = {ok(om_push(osb, [contact(f"r{i}")]), 1)["request_id"] for i in range(5)}
        assert len(ids) == 5

    def test_errors_by_request_id_are_those_requests_only(self, osb: Sandbox) -> None:
        """Errors tied to their request: a lookup by request_id never returns another request's."""
        first = ok(om_push(osb, [contact("a1", email="bad-a"), contact("a2")]), 1, 1)["request_id"]
        ok(om_push(osb, [contact("b1", email="bad-b")]), 0, 1)  # a newer error, of another request
        third = ok(om_push(osb, [contact("c1"), contact("c2"), contact("c3", email="bad-c")]), 2, 1)["request_id"]
        r = requests.get(
            f"{osb.ometria_url}/push/_errors",
            params=[("request_id", first), ("request_id", third)],
            headers={"X-Ometria-Auth": osb.client("client-1").ometria_key},
            timeout=TIMEOUT,
        )
        got = [(e["request_id"], e["error_path"]) for e in r.json()]
        assert got == [(first, "[0].email"), (third, "[2].email")]

    def test_validation_after_the_answer(self, osb: Sandbox) -> None:
        """Ometria's "OK" only says received: a record can fail when processed, seen only in the errors."""
        osb.state.config.ometria.late_reject_email_pattern = r"^late"
        try:
            answer = ok(om_push(osb, [contact("x1", email="late@example.org"), contact("x2")]), 2, 0)
        finally:
            osb.state.config.ometria.late_reject_email_pattern = None
        assert set(osb.ometria_contacts("client-1", "mailchimp-test")) == {"x2"}
        errs = errors(osb)
        assert [(e["request_id"], e["error_path"]) for e in errs] == [(answer["request_id"], "[0].email")]

    def test_errors_keep_the_last_100(self, osb: Sandbox) -> None:
        for batch in range(3):
            records = [contact(f"b{batch}-{i}", email=f"bad-{batch}-{i}") for i in range(50)]
            ok(om_push(osb, records), 0, 50)
        errs = errors(osb)
        assert len(errs) == 100
        assert not any("bad-0-" in e["error_message"] for e in errs)
        assert "bad-1-0" in errs[0]["error_message"]
        assert "bad-2-49" in errs[-1]["error_message"]
        assert errs[-1]["error_path"] == "[49].email"
        assert errors(osb, "client-2") == []


# ------------------------------------------------------------------------------------------ upsert
class TestUpsert:
    def test_same_record_twice_is_stored_once_with_the_last_values(self, osb: Sandbox) -> None:
        ok(om_push(osb, [contact("u1", firstname="First")]), 1)
        ok(om_push(osb, [contact("u1", firstname="Second")]), 1)
        stored = osb.ometria_contacts("client-1", "mailchimp-test")
        assert list(stored) == ["u1"]
        assert stored["u1"]["firstname"] == "Second"
        assert osb.ometria_writes("client-1") == 2

    def test_last_write_wins_within_one_batch(self, osb: Sandbox) -> None:
        ok(om_push(osb, [contact("u1", firstname="A"), contact("u1", firstname="B")]), 2)
        assert osb.ometria_contacts("client-1", "mailchimp-test")["u1"]["firstname"] == "B"

    def test_key_is_collection_and_id(self, osb: Sandbox) -> None:
        ok(om_push(osb, [contact("same", collection="mailchimp-a"), contact("same", collection="mailchimp-b")]), 2)
        assert set(osb.ometria_contacts("client-1")) == {"mailchimp-a/same", "mailchimp-b/same"}
        assert osb.ometria_contacts("client-2") == {}

    def test_without_merge_a_write_replaces(self, osb: Sandbox) -> None:
        ok(om_push(osb, [contact("m", firstname="A", lastname="B")]), 1)
        ok(om_push(osb, [contact("m", firstname="C")]), 1)
        stored = osb.ometria_contacts("client-1", "mailchimp-test")["m"]
        assert stored["firstname"] == "C"
        assert "lastname" not in stored

    def test_merge_keeps_unset_fields(self, osb: Sandbox) -> None:
        first = contact("m", firstname="A", lastname="B", properties={"x": 1, "y": 2})
        ok(om_push(osb, [first]), 1)
        patch = {"@type": "contact", "@collection": "mailchimp-test", "id": "m", "email": "m@example.org"}
        ok(om_push(osb, [{**patch, "@merge": True, "firstname": "C", "properties": {"y": 3}}]), 1)
        stored = osb.ometria_contacts("client-1", "mailchimp-test")["m"]
        assert stored["firstname"] == "C"
        assert stored["lastname"] == "B"
        assert stored["marketing_optin"] == "EXPLICITLY_OPTEDIN"
        assert stored["properties"] == {"x": 1, "y": 3}
        assert "@merge" not in stored


# ------------------------------------------------------------------------------------------ faults
class TestFaults:
    @pytest.mark.parametrize("kind", ["500", "503"])
    def test_error_statuses_store_nothing(self, osb: Sandbox, kind: str) -> None:
        osb.script_faults("client-1", [kind])
        assert om_push(osb, [contact("f")]).status_code == int(kind)
        assert osb.ometria_contacts("client-1") == {}
        ok(om_push(osb, [contact("f")]), 1)

    def test_504_after_the_gateway_delay(self, osb: Sandbox) -> None:
        osb.script_faults("client-1", ["504"])
        started = time.perf_counter()
        assert om_push(osb, [contact("f")]).status_code == 504
        assert time.perf_counter() - started >= 0.1 * 0.95
        assert osb.ometria_contacts("client-1") == {}

    def test_drop_stores_nothing(self, osb: Sandbox) -> None:
        osb.script_faults("client-1", ["drop"])
        with pytest.raises(requests.exceptions.ConnectionError):
            om_push(osb, [contact("d")])
        assert osb.ometria_contacts("client-1") == {}

    def test_store_then_drop(self, osb: Sandbox) -> None:
        osb.script_faults("client-1", ["store_then_drop"])
        with pytest.raises(requests.exceptions.ConnectionError):
            om_push(osb, [contact("s1"), contact("s2")])
        assert set(osb.ometria_contacts("client-1", "mailchimp-test")) == {"s1", "s2"}

    @pytest.mark.parametrize("kind", ["slow", "store_then_slow"])
    def test_store_then_slow(self, osb: Sandbox, kind: str) -> None:
        osb.script_faults("client-1", [kind])
        started = time.perf_counter()
        with pytest.raises(requests.exceptions.ReadTimeout):
            om_push(osb, [contact("slow")], timeout=0.25)
        assert time.perf_counter() - started < SLOW_DELAY_S
        assert set(osb.ometria_contacts("client-1", "mailchimp-test")) == {"slow"}
        # The abandoned request is still counted (status 0), and its slot freed, once the client hangs up.
        log = lambda: [rec for rec in osb.request_log("ometria:client-1") if rec.fault == "store_then_slow"]  # noqa: E731
        wait_for(lambda: bool(log()), 2.0)
        [rec] = log()
        assert rec.status == 0
        wait_for(lambda: osb.stats("ometria:client-1")["in_flight"] == 0, 1.0)

    def test_client_faults_do_not_touch_another_client(self, osb: Sandbox) -> None:
        osb.script_faults("client-1", ["500", "500"])
        ok(om_push(osb, [contact("x")], "client-2"), 1)
        assert om_push(osb, [contact("x")]).status_code == 500

    def test_server_wide_script(self, osb: Sandbox) -> None:
        osb.script_faults("ometria", ["503", "503"])
        assert om_push(osb, [contact("x")], "client-2").status_code == 503
        assert om_push(osb, [contact("x")]).status_code == 503
        ok(om_push(osb, [contact("x")]), 1)


# ------------------------------------------------------------------------------------------ limits
@pytest.fixture
def lim(make_sandbox: Callable[..., Sandbox]) -> Sandbox:
    """Ometria's real rate (8 per sliding second) and a small, slowly draining backlog."""
    config = SandboxConfig.generated(
        clients=3, lists_per_client=1, members=5, ometria={"backlog_limit": 150, "drain_per_second": 10}
    )
    return make_sandbox(config)


class TestLimits:
    def test_nine_requests_in_a_second_get_429_with_retry_after(self, lim: Sandbox) -> None:
        barrier = threading.Barrier(12)

        def push(i: int) -> requests.Response:
            barrier.wait()
            return om_push(lim, [contact(f"r{i}")])

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(push, range(12)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [202] * 8 + [429] * 4
        for r in answers:
            if r.status_code == 429:
                refused(r, 429, "too many requests")
                assert int(r.headers["Retry-After"]) == 1  # the oldest leaves the window within a second
        assert len(lim.ometria_contacts("client-1")) == 8
        assert lim.stats("ometria:client-1")["throttled"] == 4
        ok(om_push(lim, [contact("other")], "client-2"), 1)  # per key

    def test_the_window_slides(self) -> None:
        account = SandboxOmetriaAccount("c", "k" * 16, OmetriaSettings(rate_per_second=8))
        for i in range(8):
            assert account.admit(now=100.0 + i * 0.1) is None  # 100.0 .. 100.7
        assert account.admit(now=100.75) == pytest.approx(0.25)  # the first leaves the window at 101.0
        assert account.admit(now=100.99) == pytest.approx(0.01)
        assert account.admit(now=101.0) is None  # one second after the first: room for one
        assert account.admit(now=101.05) is not None
        assert account.admit(now=101.1) is None  # the second one has left too

    def test_backlog_limit(self, lim: Sandbox) -> None:
        first = om_push(lim, [contact(f"a{i}") for i in range(100)], "client-3")
        ok(first, 100)
        assert first.headers["X-QueueSize-Limit"] == "150"
        assert 45 <= int(first.headers["X-QueueSize-Remaining"]) <= 55
        full = om_push(lim, [contact(f"b{i}") for i in range(100)], "client-3")
        refused(full, 429, "backlog")
        assert full.headers["X-QueueSize-Limit"] == "150"
        assert 45 <= int(full.headers["X-QueueSize-Remaining"]) < 100
        assert int(full.headers["Retry-After"]) >= 1
        assert len(lim.ometria_contacts("client-3")) == 100  # the refused batch was not stored
        ok(om_push(lim, [contact(f"c{i}") for i in range(40)], "client-3"), 40)  # what fits still goes
        ok(om_push(lim, [contact(f"d{i}") for i in range(100)], "client-1"), 100)  # per key

    def test_the_backlog_drains(self) -> None:
        account = SandboxOmetriaAccount("c", "k" * 16, OmetriaSettings(backlog_limit=150, drain_per_second=10))
        account._backlog_at = 0.0
        assert account.backlog(now=0.0) == 0
        account._backlog = 120.0
        assert account.backlog(now=5.0) == 70
        assert account.backlog(now=100.0) == 0


# ------------------------------------------------------------------------------------------ inspection
def test_per_key_inspection_and_reset(make_sandbox: Callable[..., Sandbox]) -> None:
    config = SandboxConfig.generated(
        clients=2, lists_per_client=1, members=5, ometria={"latency": {"base_ms": 200}, "rate_per_second": 100}
    )
    sb = make_sandbox(config)
    bodies = [json.dumps([contact(f"p{i}-{j}") for j in range(i + 1)]).encode() for i in range(5)]
    barrier = threading.Barrier(5)

    def push(body: bytes) -> requests.Response:
        barrier.wait()
        return om_push(sb, data=body)

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(push, bodies))
    assert [r.status_code for r in answers] == [202] * 5
    om_push(sb, [contact("x")], key="wrong-key-000")
    stats = sb.stats("ometria:client-1")
    assert stats["requests"] == 5
    assert stats["peak_in_flight"] == 5
    wait_for(lambda: sb.stats("ometria:client-1")["in_flight"] == 0)
    assert stats["throttled"] == 0
    assert stats["bytes_received"] == sum(len(b) for b in bodies)
    assert stats["bytes_sent"] == sum(len(r.content) for r in answers)
    assert stats["statuses"] == {"202": 5}
    assert sb.stats("ometria:<unknown>")["statuses"] == {"401": 1}
    assert sb.stats("ometria:client-2")["requests"] == 0
    over_http = admin(sb, "GET", "/stats").json()["keys"]["ometria:client-1"]
    assert over_http["bytes_received"] == stats["bytes_received"]
    sb.reset_stats()
    assert sb.stats("ometria:client-1")["requests"] == 0
    assert sb.stats("ometria:client-1")["peak_in_flight"] == 0
    assert len(sb.ometria_contacts("client-1")) == 15  # a stats reset keeps the data


# ------------------------------------------------------------------------------------------ subscription hierarchy
class TestSubscriptionHierarchy:
    """Ometria's documented hierarchy (sandbox/consent.py): forced listings win and stay in force;
    without force an opt-out wins; the subscribe event needs marketing_optin and timestamp_subscribed."""

    C = "mailchimp-test"
    OUT, IN = "EXPLICITLY_OPTEDOUT", "EXPLICITLY_OPTEDIN"

    def optin(self, osb: Sandbox, rid: str) -> str | None:
        return osb.ometria_contacts("client-1", self.C)[rid].get("marketing_optin")

    def unsubscribe_in_ometria(self, osb: Sandbox, rid: str, **body: Any) -> requests.Response:
        return admin(osb, "POST", f"/ometria/accounts/client-1/contacts/{self.C}/{rid}/unsubscribe", json=body)

    def test_an_ometria_unsubscribe_beats_unforced_opt_ins_not_forced_ones(self, osb: Sandbox) -> None:
        ok(om_push(osb, [contact("u")]), 1)
        r = self.unsubscribe_in_ometria(osb, "u")
        assert r.status_code == 200, r.text
        assert r.json()["marketing_optin"] == self.OUT and r.json()["timestamp_unsubscribed"]
        ok(om_push(osb, [contact("u", firstname="Again")]), 1)  # the next full refresh, unforced
        stored = osb.ometria_contacts("client-1", self.C)["u"]
        assert stored["marketing_optin"] == self.OUT and stored["firstname"] == "Again"
        ok(om_push(osb, [contact("u", **{"@force_optin": True})]), 1)  # the documented risk of forcing
        assert self.optin(osb, "u") == self.IN
        assert osb.ometria_subscription("client-1", self.C, "u")["forced"] == self.IN

    def test_a_forced_listing_stays_in_force_until_another_forced_one(self, osb: Sandbox) -> None:
        ok(om_push(osb, [contact("f", **{"@force_optin": True})]), 1)
        ok(om_push(osb, [contact("f", marketing_optin=self.OUT)]), 1)  # unforced: does not beat it
        assert self.optin(osb, "f") == self.IN
        ok(om_push(osb, [contact("f", marketing_optin=self.OUT, **{"@force_optin": True})]), 1)
        assert self.optin(osb, "f") == self.OUT
        ok(om_push(osb, [contact("f")]), 1)  # nor does an unforced opt-in beat a forced opt-out
        assert self.optin(osb, "f") == self.OUT

    def test_a_preference_centre_unsubscribe_is_forced(self, osb: Sandbox) -> None:
        ok(om_push(osb, [contact("p", **{"@force_optin": True})]), 1)
        assert self.unsubscribe_in_ometria(osb, "p", force=True).status_code == 200
        assert self.optin(osb, "p") == self.OUT
        osb.ometria_unsubscribe("client-1", self.C, "p")  # the Python door says the same
        sub = osb.ometria_subscription("client-1", self.C, "p")
        assert sub["listings"] == {"api": self.IN, "ometria": self.OUT} and sub["forced"] == self.OUT

    def test_without_force_an_opt_out_wins_and_leaving_out_the_optin_changes_nothing(self, osb: Sandbox) -> None:
        ok(om_push(osb, [contact("o", marketing_optin=self.OUT)]), 1)
        assert self.optin(osb, "o") == self.OUT
        ok(om_push(osb, [contact("o")]), 1)  # the same (api) listing now says in: nothing else says out
        assert self.optin(osb, "o") == self.IN
        patch = {"@type": "contact", "@collection": self.C, "id": "o", "email": "o@example.org", "@merge": True}
        ok(om_push(osb, [{**patch, "firstname": "Merged"}]), 1)
        assert self.optin(osb, "o") == self.IN
        no_optin = contact("o")
        del no_optin["marketing_optin"]
        ok(om_push(osb, [no_optin]), 1)  # a listing without consent data does not decide it
        assert self.optin(osb, "o") is None

    def test_the_subscribe_event_needs_the_optin_and_its_timestamp_together(self, osb: Sandbox) -> None:
        bare = contact("n")
        del bare["timestamp_subscribed"]
        ok(om_push(osb, [bare, contact("t"), contact("t")]), 3)
        assert osb.ometria_subscription("client-1", self.C, "n")["events"] == []
        assert osb.ometria_subscription("client-1", self.C, "t")["events"] == ["subscribed"]
        self.unsubscribe_in_ometria(osb, "t")
        self.unsubscribe_in_ometria(osb, "t")
        assert osb.ometria_subscription("client-1", self.C, "t")["events"] == ["subscribed", "unsubscribed"]
        assert osb.state.om_by_client["client-1"].events == {"subscribed": 1, "unsubscribed": 1}  # first time only

    def test_the_bookkeeping_is_not_a_field_and_unknown_contacts_are_refused(self, osb: Sandbox) -> None:
        ok(om_push(osb, [contact("k", **{"@force_optin": True})]), 1)
        stored = osb.ometria_contacts("client-1", self.C)["k"]
        assert not any(k.startswith(("~", "@force")) for k in stored)
        listed = admin(osb, "GET", "/ometria/accounts/client-1/contacts").json()["contacts"][self.C]["k"]
        assert listed == stored
        r = self.unsubscribe_in_ometria(osb, "nobody")
        assert r.status_code == 400 and "nobody" in r.text
