"""The sandbox's admin API, in Python and over HTTP under /_sandbox: mutations, clock, faults, stats, reset."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import requests

from mc_pipeline.sandbox import Sandbox
from mc_pipeline.sandbox.generate import member_id
from mc_pipeline.sandbox.mailchimp import MailchimpProblem
from mc_pipeline_tests.sandbox.wire import admin, all_members, assert_problem, contact, mc_get, members, om_push


def pick(sb: Sandbox, list_id: str, n: int, status: str = "subscribed") -> list[dict[str, Any]]:
    found = [m for m in sb.mailchimp_list(list_id).members() if m["status"] == status][:n]
    assert len(found) == n
    return found


def served(sb: Sandbox, list_id: str, **params: Any) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in all_members(sb, list_id, **params)}


def everywhere(sb: Sandbox, list_id: str) -> set[str]:
    """Ids served by the default listing and by every status filter."""
    ids = set(served(sb, list_id))
    for status in ("subscribed", "unsubscribed", "cleaned", "pending", "transactional", "archived"):
        ids |= set(served(sb, list_id, status=status))
    return ids


# ------------------------------------------------------------------------------------------ Python API
class TestPythonAdmin:
    def test_add_member(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        before = members(fresh, lid, count=1)["total_items"]
        added = fresh.add_member(lid, "New.Person+tag@Example.org", merge_fields={"FNAME": "Zoë", "LNAME": "Ng"})
        assert added["id"] == member_id("new.person+tag@example.org")
        got = mc_get(fresh, f"/lists/{lid}/members/{added['id']}").json()
        assert got["email_address"] == "New.Person+tag@Example.org"
        assert got["status"] == "subscribed"
        assert got["merge_fields"]["FNAME"] == "Zoë"
        assert got["full_name"] == "Zoë Ng"
        assert abs(datetime.fromisoformat(got["last_changed"]) - fresh.clock.now_dt()) <= timedelta(seconds=2)
        assert got["timestamp_opt"] == got["timestamp_signup"] == got["last_changed"]
        assert members(fresh, lid, count=1)["total_items"] == before + 1

    def test_adding_an_existing_email_fails(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        existing = pick(fresh, lid, 1)[0]
        with pytest.raises(MailchimpProblem, match="already a list member"):
            fresh.add_member(lid, existing["email_address"].upper())

    def test_update_and_last_changed_follows_the_clock(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        m = pick(fresh, lid, 1)[0]
        t1 = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
        fresh.clock.set(t1)
        fresh.update_member(lid, m["id"], merge_fields={"LNAME": "Changed"})
        got = mc_get(fresh, f"/lists/{lid}/members/{m['id']}").json()
        assert got["merge_fields"]["LNAME"] == "Changed"
        assert got["merge_fields"]["FNAME"] == m["merge_fields"].get("FNAME", "")  # other fields kept
        assert abs(datetime.fromisoformat(got["last_changed"]) - t1) <= timedelta(seconds=2)
        fresh.clock.advance(3600)
        fresh.update_member(lid, m["email_address"], merge_fields={"PHONE": "+44 7000 000000"})
        again = mc_get(fresh, f"/lists/{lid}/members/{m['id']}").json()
        step = datetime.fromisoformat(again["last_changed"]) - datetime.fromisoformat(got["last_changed"])
        assert timedelta(seconds=3599) <= step <= timedelta(seconds=3602)

    @pytest.mark.parametrize(
        ("status", "listed_by_default"),
        [("unsubscribed", True), ("cleaned", True), ("archived", False), ("pending", True)],
    )
    def test_set_status(self, fresh: Sandbox, status: str, listed_by_default: bool) -> None:
        lid = fresh.client("client-1").list_ids[0]
        m = pick(fresh, lid, 1)[0]
        fresh.set_status(lid, m["id"], status)
        assert (m["id"] in served(fresh, lid)) is listed_by_default
        assert served(fresh, lid, status=status)[m["id"]]["status"] == status
        assert m["id"] not in served(fresh, lid, status="subscribed")

    def test_resubscribe(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        m = pick(fresh, lid, 1, status="unsubscribed")[0]
        fresh.set_status(lid, m["id"], "subscribed")
        got = served(fresh, lid, status="subscribed")[m["id"]]
        assert "unsubscribe_reason" not in got
        assert got["timestamp_opt"] == got["last_changed"]

    def test_delete_vanishes_from_every_listing(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        live, archived = pick(fresh, lid, 1)[0], pick(fresh, lid, 1, status="archived")[0]
        assert {live["id"], archived["id"]} <= everywhere(fresh, lid)
        before = len(fresh.mailchimp_list(lid))
        for m in (live, archived):
            fresh.delete_member(lid, m["id"])
        assert not {live["id"], archived["id"]} & everywhere(fresh, lid)
        assert_problem(mc_get(fresh, f"/lists/{lid}/members/{live['id']}"), 404)
        assert len(fresh.mailchimp_list(lid)) == before - 2
        # A deleted email can be added again.
        fresh.add_member(lid, live["email_address"])
        assert live["id"] in served(fresh, lid)

    def test_since_previous_max_returns_exactly_the_changed_members(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        first = served(fresh, lid)
        previous_max = max(m["last_changed"] for m in first.values())
        fresh.clock.advance(60)
        upd, unsub, clean, archive, delete = pick(fresh, lid, 5)
        resub = pick(fresh, lid, 1, status="archived")[0]
        fresh.update_member(lid, upd["id"], merge_fields={"FNAME": "Updated"})
        fresh.set_status(lid, unsub["id"], "unsubscribed")
        fresh.set_status(lid, clean["id"], "cleaned")
        fresh.set_status(lid, archive["id"], "archived")
        fresh.set_status(lid, resub["id"], "subscribed")
        fresh.delete_member(lid, delete["id"])
        added = fresh.add_member(lid, "brand.new@example.org")

        changed = served(fresh, lid, since_last_changed=previous_max)
        assert set(changed) == {upd["id"], unsub["id"], clean["id"], resub["id"], added["id"]}
        assert changed[unsub["id"]]["status"] == "unsubscribed"
        assert changed[clean["id"]]["status"] == "cleaned"
        assert changed[upd["id"]]["merge_fields"]["FNAME"] == "Updated"
        assert set(served(fresh, lid, status="archived", since_last_changed=previous_max)) == {archive["id"]}
        assert all(m["last_changed"] > previous_max for m in changed.values())
        # Nothing else moved: the rest of the list is served as before.
        unchanged = served(fresh, lid, before_last_changed=previous_max)
        assert unchanged == {k: v for k, v in first.items() if k not in {*changed, archive["id"], delete["id"]}}

    def test_changes_stay_in_their_list(self, fresh: Sandbox) -> None:
        one, two = fresh.client("client-1").list_ids
        before = members(fresh, two, count=1000)
        for m in pick(fresh, one, 3):
            fresh.set_status(one, m["id"], "cleaned")
        fresh.add_member(one, "only.in.one@example.org")
        after = members(fresh, two, count=1000)
        assert after["members"] == before["members"]

    def test_revoked_mailchimp_key_is_refused(self, fresh: Sandbox) -> None:
        fresh.revoke("client-1", "mailchimp")
        assert_problem(mc_get(fresh, "/lists"), 403)
        assert mc_get(fresh, "/lists", "client-2").status_code == 200
        fresh.revoke("client-1", "mailchimp", revoked=False)
        assert mc_get(fresh, "/lists").status_code == 200


# ------------------------------------------------------------------------------------------ HTTP routes
class TestHttpAdmin:
    def test_health_and_config(self, fresh: Sandbox) -> None:
        assert admin(fresh, "GET", "/health").json() == {"status": "ok"}
        config = admin(fresh, "GET", "/config").json()
        assert config["seed"] == 42
        assert [c["client_id"] for c in config["clients"]] == ["client-1", "client-2"]
        lists = config["clients"][0]["lists"]
        assert [x["id"] for x in lists] == list(fresh.client("client-1").list_ids)
        assert [x["members"] for x in lists] == [120, 60]
        text = admin(fresh, "GET", "/config").text
        for c in fresh.clients():  # no secrets in the config view
            assert c.mailchimp_key not in text and c.mailchimp_key[:32] not in text and c.ometria_key not in text

    def test_add_member_route(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        r = admin(
            fresh,
            "POST",
            f"/mailchimp/lists/{lid}/members",
            json={"email_address": "Http.Added@example.org", "status": "pending", "merge_fields": {"FNAME": "H"}},
        )
        assert r.status_code == 201
        mid = r.json()["id"]
        got = served(fresh, lid, status="pending")[mid]
        assert got["email_address"] == "Http.Added@example.org"
        assert got["merge_fields"]["FNAME"] == "H"
        assert got["timestamp_opt"] == ""
        again = admin(
            fresh, "POST", f"/mailchimp/lists/{lid}/members", json={"email_address": "http.added@example.org"}
        )
        assert again.status_code == 400
        assert (
            admin(fresh, "POST", "/mailchimp/lists/0000000000/members", json={"email_address": "a@b.co"}).status_code
            == 404
        )

    def test_update_member_route(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        m = pick(fresh, lid, 1)[0]
        r = admin(fresh, "PATCH", f"/mailchimp/lists/{lid}/members/{m['id']}", json={"merge_fields": {"LNAME": "Via"}})
        assert r.status_code == 200
        assert mc_get(fresh, f"/lists/{lid}/members/{m['id']}").json()["merge_fields"]["LNAME"] == "Via"
        bad = admin(fresh, "PATCH", f"/mailchimp/lists/{lid}/members/{m['id']}", json={"email_address": "x@y.zz"})
        assert bad.status_code == 400
        gone = admin(fresh, "PATCH", f"/mailchimp/lists/{lid}/members/{'0' * 32}", json={"vip": True})
        assert gone.status_code == 404

    @pytest.mark.parametrize(
        ("action", "status"),
        [("unsubscribe", "unsubscribed"), ("clean", "cleaned"), ("archive", "archived")],
    )
    def test_status_action_routes(self, fresh: Sandbox, action: str, status: str) -> None:
        lid = fresh.client("client-1").list_ids[0]
        m = pick(fresh, lid, 1)[0]
        r = admin(fresh, "POST", f"/mailchimp/lists/{lid}/members/{m['email_address']}/actions/{action}")
        assert r.status_code == 200
        assert r.json()["status"] == status
        assert served(fresh, lid, status=status)[m["id"]]["status"] == status

    def test_resubscribe_and_delete_routes(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        archived = pick(fresh, lid, 1, status="archived")[0]
        r = admin(fresh, "POST", f"/mailchimp/lists/{lid}/members/{archived['id']}/actions/resubscribe")
        assert r.status_code == 200
        assert served(fresh, lid)[archived["id"]]["status"] == "subscribed"
        r = admin(fresh, "POST", f"/mailchimp/lists/{lid}/members/{archived['id']}/actions/delete")
        assert r.status_code == 200
        assert archived["id"] not in everywhere(fresh, lid)
        unknown = admin(fresh, "POST", f"/mailchimp/lists/{lid}/members/{archived['id']}/actions/explode")
        assert unknown.status_code == 400

    def test_clock_route(self, fresh: Sandbox) -> None:
        start = datetime.fromisoformat(admin(fresh, "GET", "/clock").json()["now"])
        advanced = datetime.fromisoformat(admin(fresh, "POST", "/clock", json={"advance": 7200}).json()["now"])
        assert timedelta(seconds=7199) <= advanced - start <= timedelta(seconds=7205)
        when = "2032-01-02T03:04:05+00:00"
        r = admin(fresh, "POST", "/clock", json={"set": when})
        assert abs(datetime.fromisoformat(r.json()["now"]) - datetime.fromisoformat(when)) <= timedelta(seconds=2)
        lid = fresh.client("client-1").list_ids[0]
        m = pick(fresh, lid, 1)[0]
        admin(fresh, "POST", f"/mailchimp/lists/{lid}/members/{m['id']}/actions/unsubscribe")
        changed = mc_get(fresh, f"/lists/{lid}/members/{m['id']}").json()["last_changed"]
        assert changed.startswith("2032-01-02T03:04:0")
        reset = datetime.fromisoformat(admin(fresh, "POST", "/clock", json={"reset": True}).json()["now"])
        assert abs(reset - datetime.now(UTC)) < timedelta(seconds=5)

    def test_the_date_header_and_last_changed_follow_the_clock(self, fresh: Sandbox) -> None:
        """The Date header and `last_changed` both follow the sandbox's clock, so tests advance it rather than wait."""
        lid = fresh.client("client-1").list_ids[0]
        m = pick(fresh, lid, 1)[0]
        when = datetime(2033, 4, 5, 6, 7, 8, tzinfo=UTC)
        fresh.clock.set(when)
        fresh.update_member(lid, m["id"], merge_fields={"LNAME": "Now"})
        r = mc_get(fresh, f"/lists/{lid}/members/{m['id']}")
        changed = datetime.fromisoformat(r.json()["last_changed"])
        assert abs(parsedate_to_datetime(r.headers["Date"]) - when) < timedelta(seconds=5)
        pushed = om_push(fresh, [contact("c-date")])
        assert abs(parsedate_to_datetime(pushed.headers["Date"]) - when) < timedelta(seconds=5)
        fresh.clock.advance(1)  # the Date moves with the clock: a second on, it is past the change
        served = parsedate_to_datetime(mc_get(fresh, f"/lists/{lid}/members/{m['id']}").headers["Date"])
        assert served - timedelta(seconds=1) >= changed

    def test_faults_route(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        r = admin(fresh, "POST", "/faults", json={"target": lid, "script": ["503", "500"]})
        assert r.json() == {"target": lid, "pending": 2}
        assert_problem(mc_get(fresh, f"/lists/{lid}/members"), 503)
        assert_problem(mc_get(fresh, f"/lists/{lid}/members"), 500)
        assert mc_get(fresh, f"/lists/{lid}/members").status_code == 200
        rates = admin(fresh, "POST", "/faults", json={"target": lid, "rates": {"error_rate": 1.0}})
        assert rates.status_code == 200
        assert mc_get(fresh, f"/lists/{lid}/members").status_code in (500, 503)
        admin(fresh, "POST", "/faults", json={"target": lid, "rates": None})
        assert mc_get(fresh, f"/lists/{lid}/members").status_code == 200
        assert admin(fresh, "POST", "/faults", json={"target": lid, "script": ["teapot"]}).status_code == 400

    def test_stats_route(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        for _ in range(3):
            mc_get(fresh, f"/lists/{lid}/members")
        mc_get(fresh, "/lists", "client-2")
        stats = admin(fresh, "GET", "/stats").json()
        one = stats["keys"]["mailchimp:client-1"]
        assert one["requests"] == 3
        assert one["statuses"] == {"200": 3}
        assert one["routes"] == {"GET /3.0/lists/{list_id}/members": 3}
        assert one["bytes_sent"] > 0
        assert stats["keys"]["mailchimp:client-2"]["requests"] == 1
        assert isinstance(stats["server_cpu_s"], float)
        assert fresh.client("client-1").mailchimp_key not in str(stats)
        logged = admin(fresh, "GET", "/stats", params={"log": "1"}).json()["keys"]["mailchimp:client-1"]["log"]
        assert [x["status"] for x in logged] == [200, 200, 200]

    def test_reset_route(self, fresh: Sandbox) -> None:
        lid = fresh.client("client-1").list_ids[0]
        mc_get(fresh, f"/lists/{lid}/members")
        assert om_push(fresh, [contact("r1")]).status_code == 202
        fresh.script_faults(lid, ["500"])
        assert admin(fresh, "POST", "/reset").json() == {"status": "reset"}
        assert fresh.stats("mailchimp:client-1")["requests"] == 0
        assert mc_get(fresh, f"/lists/{lid}/members").status_code == 200  # the scripted 500 is gone
        assert fresh.ometria_contacts("client-1")  # contacts kept unless asked
        admin(fresh, "POST", "/reset", json={"ometria": True})
        assert fresh.ometria_contacts("client-1") == {}
        assert fresh.ometria_writes("client-1") == 0

    def test_ometria_contacts_route(self, fresh: Sandbox) -> None:
        om_push(fresh, [contact("c1", collection="mailchimp-a"), contact("c2", collection="mailchimp-b")])
        every = admin(fresh, "GET", "/ometria/accounts/client-1/contacts").json()
        assert set(every["contacts"]) == {"mailchimp-a", "mailchimp-b"}
        assert every["writes"] == 2
        one = admin(fresh, "GET", "/ometria/accounts/client-1/contacts", params={"collection": "mailchimp-a"}).json()
        assert list(one["contacts"]["mailchimp-a"]) == ["c1"]
        assert one["contacts"]["mailchimp-a"]["c1"]["email"] == "c1@example.org"
        other = admin(fresh, "GET", "/ometria/accounts/client-2/contacts").json()
        assert other["contacts"] == {} and other["writes"] == 0

    def test_revoke_route(self, fresh: Sandbox) -> None:
        r = admin(fresh, "POST", "/ometria/accounts/client-1/revoke", json={})
        assert r.json()["revoked"] is True
        assert om_push(fresh, [contact("x")]).status_code == 403
        admin(fresh, "POST", "/ometria/accounts/client-1/revoke", json={"revoked": False})
        assert om_push(fresh, [contact("x")]).status_code == 202


def test_admin_routes_need_no_mailchimp_key(fresh: Sandbox) -> None:
    """The admin API is the sandbox's own; the Mailchimp API still refuses keyless calls."""
    assert requests.get(f"{fresh.base_url}/_sandbox/health", timeout=5).status_code == 200
    assert requests.get(f"{fresh.mailchimp_url}/lists", timeout=5).status_code == 401


def test_stats_count_a_request_before_its_answer_reaches_the_client(fresh: Sandbox) -> None:
    """Read in-process right after each answer (a drop, a 401, a 200, a push), the stats already
    count the request (regression: they were written after the body, so a test could miss it)."""
    lid = fresh.client("client-1").list_ids[0]
    session = requests.Session()
    key = fresh.client("client-1").mailchimp_key
    for i in range(1, 61):
        if i % 3 == 0:
            fresh.script_faults(lid, ["drop"])
            with pytest.raises(requests.exceptions.ConnectionError):
                session.get(f"{fresh.mailchimp_url}/lists/{lid}/members", auth=("x", key), timeout=5)
        else:
            session.get(f"{fresh.mailchimp_url}/lists/{lid}/members", auth=("x", key), timeout=5)
        assert fresh.stats("mailchimp:client-1")["requests"] == i
        session.get(f"{fresh.mailchimp_url}/lists", auth=("x", "f" * 32 + "-us6"), timeout=5)
        assert fresh.stats("mailchimp:<unknown>")["requests"] == i
        om_push(fresh, [contact(f"s{i}")])
        assert fresh.stats("ometria:client-1")["requests"] == i


# ------------------------------------------------------------------------------------------ atomic changes
def _list_state(sb: Sandbox, list_id: str) -> tuple[Any, ...]:
    """What a list serves, through every query shape a sync uses."""
    return (
        served(sb, list_id),
        {s: sorted(served(sb, list_id, status=s)) for s in ("subscribed", "archived", "pending")},
        [m["id"] for m in all_members(sb, list_id, sort_field="last_changed", sort_dir="DESC")],
        sorted(served(sb, list_id, since_last_changed="2000-01-01T00:00:00+00:00")),
        sb.mailchimp_list(list_id).counts(),
    )


def test_a_refused_admin_change_leaves_the_list_exactly_as_it_was(fresh: Sandbox) -> None:
    """Issue 9 item 15: an add with an unknown status used to append half a member (its JSON and
    times but no status), so once the list changed again, pages with a filter answered 500."""
    lid = fresh.client("client-1").list_ids[0]
    m = pick(fresh, lid, 1)[0]
    before = _list_state(fresh, lid)
    route = f"/mailchimp/lists/{lid}/members"
    refused = [
        admin(fresh, "POST", route, json={"email_address": "half@example.org", "status": "bogus"}),
        admin(fresh, "POST", route, json={"email_address": "half@example.org", "merge_fields": ["x"]}),
        admin(fresh, "POST", route, json={"email_address": 42}),
        admin(fresh, "POST", route, json=["not", "an", "object"]),
        admin(fresh, "PATCH", f"{route}/{m['id']}", json={"status": "bogus", "merge_fields": {"FNAME": "Half"}}),
        admin(fresh, "PATCH", f"{route}/{m['id']}", json={"merge_fields": {"FNAME": "Half"}, "timestamp_opt": "x"}),
        admin(fresh, "PATCH", f"{route}/{m['id']}", json={"timestamp_signup": 12345}),
        admin(fresh, "POST", "/faults", json={"target": lid, "rates": {"error_rate": 1.0}, "script": ["teapot"]}),
        admin(fresh, "POST", "/clock", json={"advance": 3600, "set": "not a time"}),
        admin(fresh, "POST", "/clock", json={"advance": "nan"}),
    ]
    assert [r.status_code for r in refused] == [400] * len(refused), [r.text for r in refused]
    with pytest.raises(MailchimpProblem, match="Unknown status"):
        fresh.add_member(lid, "half.python@example.org", status="bogus")
    assert _list_state(fresh, lid) == before  # no half-member, no half-update, no fault rate set
    assert abs(fresh.clock.now_dt() - datetime.now(UTC)) < timedelta(seconds=5)  # the clock did not move

    fresh.add_member(lid, "after@example.org")  # a later change rebuilds the query columns
    fresh.update_member(lid, m["id"], merge_fields={"FNAME": "After"})
    for params in ({}, {"status": "subscribed"}, {"since_last_changed": "2000-01-01T00:00:00+00:00"}):
        page = mc_get(fresh, f"/lists/{lid}/members", params={"count": 1000, **params})
        assert page.status_code == 200, page.text[:300]
    assert "half@example.org" not in {x["email_address"] for x in fresh.mailchimp_list(lid).members()}
    assert served(fresh, lid)[m["id"]]["merge_fields"]["FNAME"] == "After"
    assert len(served(fresh, lid)) == len(before[0]) + 1
