"""The sandbox's Mailchimp Marketing API v3 on the wire: auth, lists, members and their query parameters.

All against the session's read-only sandbox: client-1 and client-2, each with lists of 300 and 2500.
"""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests

from mc_pipeline.sandbox import Sandbox
from mc_pipeline_tests.sandbox.wire import TIMEOUT, all_members, assert_problem, mc_get, members

STATUSES = ("subscribed", "unsubscribed", "cleaned", "pending", "transactional", "archived")
MEMBER_KEYS = {
    "id",
    "email_address",
    "unique_email_id",
    "contact_id",
    "full_name",
    "web_id",
    "email_type",
    "status",
    "merge_fields",
    "interests",
    "stats",
    "ip_signup",
    "timestamp_signup",
    "ip_opt",
    "timestamp_opt",
    "member_rating",
    "last_changed",
    "language",
    "vip",
    "location",
    "tags",
    "tags_count",
    "source",
    "list_id",
    "_links",
}


def ts(value: str) -> float:
    """A Mailchimp timestamp as epoch seconds; "" sorts first."""
    return datetime.fromisoformat(value).timestamp() if value else float("-inf")


def expected_ids(sb: Sandbox, list_id: str, *, archived: bool = False) -> set[str]:
    """The sandbox's own record of a list's non-archived (or only archived) members."""
    everyone = sb.mailchimp_list(list_id).members(include_archived=True)
    return {m["id"] for m in everyone if (m["status"] == "archived") == archived}


# ------------------------------------------------------------------------------------------ auth
class TestAuth:
    def test_key_format_is_32_hex_dash_datacenter(self, sb: Sandbox) -> None:
        keys = [sb.client(c).mailchimp_key for c in ("client-1", "client-2")]
        for key in keys:
            assert re.fullmatch(r"[0-9a-f]{32}-us6", key), key
        assert keys[0] != keys[1]

    @pytest.mark.parametrize("user", ["anystring", "", "someone@example.org", "x" * 50])
    def test_basic_auth_with_any_user_name(self, sb: Sandbox, user: str) -> None:
        c = sb.client("client-1")
        r = requests.get(f"{sb.mailchimp_url}/lists", auth=(user, c.mailchimp_key), timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        assert [lst["id"] for lst in r.json()["lists"]] == list(c.list_ids)

    def test_bearer_token(self, sb: Sandbox, small_list: str) -> None:
        key = sb.client("client-1").mailchimp_key
        r = mc_get(sb, f"/lists/{small_list}", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        assert r.json()["id"] == small_list

    @pytest.mark.parametrize("scheme", ["basic", "bearer"])
    def test_unknown_key_is_401_api_key_invalid(self, sb: Sandbox, scheme: str) -> None:
        fake = "0123456789abcdef0123456789abcdef-us6"
        assert fake not in {c.mailchimp_key for c in sb.clients()}
        if scheme == "basic":
            r = mc_get(sb, "/lists", auth=("anystring", fake))
        else:
            r = mc_get(sb, "/lists", headers={"Authorization": f"Bearer {fake}"})
        assert_problem(r, 401, "API Key Invalid")

    @pytest.mark.parametrize(
        "path", ["/", "/ping", "/lists", "/lists/{list}", "/lists/{list}/members", "/lists/{list}/members/{member}"]
    )
    def test_missing_auth_is_401_on_every_endpoint(self, sb: Sandbox, small_list: str, path: str) -> None:
        member = sb.mailchimp_list(small_list).members()[0]["id"]
        r = mc_get(sb, path.format(list=small_list, member=member), headers={})
        assert_problem(r, 401)

    @pytest.mark.parametrize(
        "header",
        [
            "Basic !!!not-base64!!!",
            "Basic " + base64.b64encode(b"no-colon-so-no-password").decode(),
            "Bearer ",
            "Token abc",
        ],
    )
    def test_malformed_authorization_is_401(self, sb: Sandbox, header: str) -> None:
        assert_problem(mc_get(sb, "/lists", headers={"Authorization": header}), 401)

    def test_each_key_sees_only_its_own_account(self, sb: Sandbox) -> None:
        one, two = sb.client("client-1"), sb.client("client-2")
        assert not set(one.list_ids) & set(two.list_ids)
        for c in (one, two):
            body = mc_get(sb, "/lists", c.client_id).json()
            assert [lst["id"] for lst in body["lists"]] == list(c.list_ids)
            assert body["total_items"] == len(c.list_ids)

    @pytest.mark.parametrize("suffix", ["", "/members", "/members/{member}"])
    def test_another_accounts_list_is_404(self, sb: Sandbox, suffix: str) -> None:
        foreign = sb.client("client-2").list_ids[0]
        member = sb.mailchimp_list(foreign).members()[0]["id"]
        r = mc_get(sb, f"/lists/{foreign}" + suffix.format(member=member), "client-1")
        assert_problem(r, 404, "Resource Not Found")
        # ...while its owner reads it.
        assert mc_get(sb, f"/lists/{foreign}" + suffix.format(member=member), "client-2").status_code == 200

    def test_ping_and_root(self, sb: Sandbox) -> None:
        assert mc_get(sb, "/ping").json() == {"health_status": "Everything's Chimpy!"}
        root = mc_get(sb, "/").json()
        assert root["account_id"] == "client-1"
        assert root["total_subscribers"] == sum(len(sb.mailchimp_list(x)) for x in sb.client("client-1").list_ids)


# ------------------------------------------------------------------------------------------ lists
class TestLists:
    def test_lists_collection_with_stats(self, sb: Sandbox) -> None:
        c = sb.client("client-1")
        r = mc_get(sb, "/lists")
        assert r.headers["Content-Type"].startswith("application/json")
        body = r.json()
        assert body["total_items"] == 2
        assert [lst["id"] for lst in body["lists"]] == list(c.list_ids)
        for lst in body["lists"]:
            counts = sb.mailchimp_list(lst["id"]).counts()
            stats = lst["stats"]
            assert stats["member_count"] == counts["subscribed"]
            assert stats["unsubscribe_count"] == counts["unsubscribed"]
            assert stats["cleaned_count"] == counts["cleaned"]
            # The wire agrees with itself: member_count is the number of subscribed members served.
            for status, key in (("subscribed", "member_count"), ("unsubscribed", "unsubscribe_count")):
                assert members(sb, lst["id"], status=status, count=1)["total_items"] == stats[key]
        big = body["lists"][1]["stats"]
        assert 0 < big["member_count"] < 2500  # subscribed only, not every member

    def test_lists_count_and_offset(self, sb: Sandbox) -> None:
        ids = list(sb.client("client-1").list_ids)
        first = mc_get(sb, "/lists", params={"count": 1}).json()
        second = mc_get(sb, "/lists", params={"count": 1, "offset": 1}).json()
        past = mc_get(sb, "/lists", params={"offset": 5}).json()
        assert [lst["id"] for lst in first["lists"]] == ids[:1]
        assert [lst["id"] for lst in second["lists"]] == ids[1:2]
        assert past["lists"] == []
        assert first["total_items"] == second["total_items"] == past["total_items"] == 2

    def test_lists_fields(self, sb: Sandbox) -> None:
        body = mc_get(sb, "/lists", params={"fields": "lists.id,lists.stats.member_count,total_items"}).json()
        assert set(body) == {"lists", "total_items"}
        for lst in body["lists"]:
            assert set(lst) == {"id", "stats"}
            assert set(lst["stats"]) == {"member_count"}

    def test_one_list(self, sb: Sandbox, big_list: str) -> None:
        one = mc_get(sb, f"/lists/{big_list}").json()
        from_collection = next(x for x in mc_get(sb, "/lists").json()["lists"] if x["id"] == big_list)
        assert one == from_collection
        assert one["name"] == sb.mailchimp_list(big_list).name
        assert datetime.fromisoformat(one["date_created"]).tzinfo is not None

    @pytest.mark.parametrize("path", ["/lists/0000000000", "/lists/0000000000/members", "/lists/nope/members/x"])
    def test_unknown_list_is_404(self, sb: Sandbox, path: str) -> None:
        assert_problem(mc_get(sb, path), 404, "Resource Not Found")

    def test_unknown_member_is_404(self, sb: Sandbox, small_list: str) -> None:
        assert_problem(mc_get(sb, f"/lists/{small_list}/members/{'0' * 32}"), 404, "Resource Not Found")

    def test_one_member_by_hash_or_email(self, sb: Sandbox, small_list: str) -> None:
        listed = members(sb, small_list, count=1)["members"][0]
        by_hash = mc_get(sb, f"/lists/{small_list}/members/{listed['id']}").json()
        by_email = mc_get(sb, f"/lists/{small_list}/members/{listed['email_address'].upper()}").json()
        assert by_hash == by_email == listed


# ------------------------------------------------------------------------------------------ members: paging
class TestMembersPaging:
    def test_response_shape(self, sb: Sandbox, small_list: str) -> None:
        body = members(sb, small_list)
        assert set(body) == {"members", "list_id", "total_items", "_links"}
        assert body["list_id"] == small_list
        assert isinstance(body["_links"], list) and body["_links"][0]["rel"] == "self"

    def test_default_count_is_10(self, sb: Sandbox, small_list: str) -> None:
        assert len(members(sb, small_list)["members"]) == 10

    @pytest.mark.parametrize("count", [1001, 5000])
    def test_count_above_1000_is_served_as_1000(self, sb: Sandbox, big_list: str, count: int) -> None:
        body = members(sb, big_list, count=count)
        assert body["total_items"] > 1000
        assert len(body["members"]) == 1000

    def test_total_items_counts_every_match_regardless_of_paging(self, sb: Sandbox, big_list: str) -> None:
        expected = len(expected_ids(sb, big_list))
        totals = {members(sb, big_list, count=n, offset=o)["total_items"] for n, o in ((1, 0), (10, 2000), (5, 99999))}
        assert totals == {expected}

    def test_offset_pages_are_consecutive_slices(self, sb: Sandbox, small_list: str) -> None:
        whole = [m["id"] for m in members(sb, small_list, count=200, fields="members.id")["members"]]
        pages = [
            [m["id"] for m in members(sb, small_list, count=50, offset=o, fields="members.id")["members"]]
            for o in (0, 50, 100, 150)
        ]
        assert [i for p in pages for i in p] == whole
        assert members(sb, small_list, offset=10_000)["members"] == []

    def test_paging_with_count_1000_yields_every_non_archived_member_once(self, sb: Sandbox, big_list: str) -> None:
        got = all_members(sb, big_list)
        ids = [m["id"] for m in got]
        assert len(ids) == len(set(ids))
        assert set(ids) == expected_ids(sb, big_list)
        assert len(ids) == members(sb, big_list, count=1)["total_items"]
        assert "archived" not in {m["status"] for m in got}

    @pytest.mark.parametrize(
        "params",
        [
            {"status": "bogus"},
            {"sort_field": "email_address"},
            {"sort_dir": "UP"},
            {"count": "ten"},
            {"offset": "-1"},
            {"since_last_changed": "yesterday"},
            {"before_last_changed": "2025-13-40T00:00:00+00:00"},
        ],
    )
    def test_invalid_parameters_are_400(self, sb: Sandbox, small_list: str, params: dict[str, str]) -> None:
        assert_problem(mc_get(sb, f"/lists/{small_list}/members", params=params), 400)


# ------------------------------------------------------------------------------------------ members: fields
class TestMembersFields:
    def test_fields_keeps_only_the_named_paths(self, sb: Sandbox, small_list: str) -> None:
        body = members(sb, small_list, count=25, fields="members.email_address,total_items")
        assert set(body) == {"members", "total_items"}
        assert len(body["members"]) == 25
        assert all(set(m) == {"email_address"} for m in body["members"])
        assert body["total_items"] == len(expected_ids(sb, small_list))

    def test_fields_nested_merge_field(self, sb: Sandbox, small_list: str) -> None:
        body = members(sb, small_list, count=100, fields="members.id,members.merge_fields.FNAME")
        truth = {m["id"]: m for m in sb.mailchimp_list(small_list).members()}
        assert set(body) == {"members"}
        with_name = 0
        for m in body["members"]:
            assert set(m) == {"id", "merge_fields"}
            expected = truth[m["id"]]["merge_fields"]
            assert m["merge_fields"] == ({"FNAME": expected["FNAME"]} if "FNAME" in expected else {})
            with_name += "FNAME" in m["merge_fields"]
        assert with_name > 50

    def test_fields_apply_through_arrays(self, sb: Sandbox, big_list: str) -> None:
        body = members(sb, big_list, count=200, fields="members.tags.name")
        tagged = [m for m in body["members"] if m["tags"]]
        assert tagged, "some members carry tags"
        assert all(set(t) == {"name"} for m in tagged for t in m["tags"])

    def test_exclude_fields(self, sb: Sandbox, small_list: str) -> None:
        body = members(
            sb, small_list, count=100, exclude_fields="_links,members._links,members.stats,members.merge_fields.ADDRESS"
        )
        assert set(body) == {"members", "list_id", "total_items"}
        for m in body["members"]:
            assert "_links" not in m and "stats" not in m
            assert "ADDRESS" not in m["merge_fields"]
            assert {"id", "email_address", "status", "last_changed"} <= set(m)
        assert any("FNAME" in m["merge_fields"] for m in body["members"])

    def test_fields_and_exclude_fields_together(self, sb: Sandbox, small_list: str) -> None:
        body = members(
            sb, small_list, count=20, fields="members.merge_fields", exclude_fields="members.merge_fields.LNAME"
        )
        assert all(set(m) == {"merge_fields"} and "LNAME" not in m["merge_fields"] for m in body["members"])

    def test_excluding_members_leaves_the_count(self, sb: Sandbox, small_list: str) -> None:
        body = members(sb, small_list, exclude_fields="members")
        assert "members" not in body
        assert body["total_items"] == len(expected_ids(sb, small_list))


# ------------------------------------------------------------------------------------------ members: filters, sort
class TestMembersFilters:
    @pytest.mark.parametrize("status", STATUSES)
    def test_status_filter(self, sb: Sandbox, big_list: str, status: str) -> None:
        got = all_members(sb, big_list, status=status, fields="members.id,members.status,total_items")
        counts = sb.mailchimp_list(big_list).counts()
        assert len(got) == counts[status] > 0
        assert {m["status"] for m in got} == {status}

    def test_archived_only_with_status_archived(self, sb: Sandbox, big_list: str) -> None:
        archived = expected_ids(sb, big_list, archived=True)
        assert archived
        default = {m["id"] for m in all_members(sb, big_list, fields="members.id,total_items")}
        asked = {m["id"] for m in all_members(sb, big_list, status="archived", fields="members.id,total_items")}
        assert not default & archived
        assert asked == archived

    def test_since_excludes_and_before_includes_the_exact_instant(self, sb: Sandbox, big_list: str) -> None:
        everyone = all_members(sb, big_list, fields="members.id,members.last_changed,total_items")
        pivot = sorted(everyone, key=lambda m: m["last_changed"])[len(everyone) // 2]
        instant = pivot["last_changed"]
        t = ts(instant)
        since = all_members(sb, big_list, since_last_changed=instant, fields="members.id,members.last_changed")
        before = all_members(sb, big_list, before_last_changed=instant, fields="members.id,members.last_changed")
        assert pivot["id"] not in {m["id"] for m in since}
        assert pivot["id"] in {m["id"] for m in before}
        assert all(ts(m["last_changed"]) > t for m in since)
        assert all(ts(m["last_changed"]) <= t for m in before)
        # Together they partition the list.
        assert len(since) + len(before) == len(everyone)
        assert {m["id"] for m in since} | {m["id"] for m in before} == {m["id"] for m in everyone}
        # since == before == the instant: nothing; a one-second window ending at it: the pivot.
        assert members(sb, big_list, since_last_changed=instant, before_last_changed=instant)["total_items"] == 0
        earlier = datetime.fromisoformat(instant) - timedelta(seconds=1)
        window = all_members(sb, big_list, since_last_changed=earlier.isoformat(), before_last_changed=instant)
        assert pivot["id"] in {m["id"] for m in window}

    def test_time_filters_honour_the_utc_offset(self, sb: Sandbox, big_list: str) -> None:
        instant = members(sb, big_list, count=1, sort_field="last_changed", sort_dir="DESC")["members"][0]
        utc = datetime.fromisoformat(instant["last_changed"])
        paris = utc.astimezone(timezone(timedelta(hours=2))).isoformat()  # same instant, +02:00
        assert paris.endswith("+02:00")
        a = members(sb, big_list, before_last_changed=instant["last_changed"], count=1)["total_items"]
        b = members(sb, big_list, before_last_changed=paris, count=1)["total_items"]
        assert a == b == len(expected_ids(sb, big_list))
        assert members(sb, big_list, since_last_changed=paris, count=1)["total_items"] == 0

    @pytest.mark.parametrize("field", ["timestamp_opt", "timestamp_signup", "last_changed"])
    @pytest.mark.parametrize("direction", ["ASC", "DESC"])
    def test_sort(self, sb: Sandbox, big_list: str, field: str, direction: str) -> None:
        got = all_members(sb, big_list, sort_field=field, sort_dir=direction, fields=f"members.id,members.{field}")
        values = [ts(m[field]) for m in got]
        assert values == sorted(values, reverse=direction == "DESC")
        assert values[0] != values[-1]
        assert {m["id"] for m in got} == expected_ids(sb, big_list)

    def test_sort_dir_is_case_insensitive_and_defaults_to_asc(self, sb: Sandbox, small_list: str) -> None:
        def ids(**params: str) -> list[str]:
            page = members(sb, small_list, count=300, sort_field="last_changed", fields="members.id", **params)
            return [m["id"] for m in page["members"]]

        assert ids() == ids(sort_dir="ASC")
        assert ids(sort_dir="desc") == ids(sort_dir="DESC")
        assert ids(sort_dir="DESC") != ids(sort_dir="ASC")


# ------------------------------------------------------------------------------------------ member shape
@pytest.fixture(scope="module")
def everyone(sb: Sandbox, big_list: str) -> list[dict[str, Any]]:
    """Every member of client-1's big list, archived ones included, as served."""
    return all_members(sb, big_list) + all_members(sb, big_list, status="archived")


class TestMemberShape:
    def test_every_member_has_the_real_keys(self, everyone: list[dict[str, Any]]) -> None:
        assert len(everyone) == 2500
        for m in everyone:
            missing = MEMBER_KEYS - set(m)
            assert not missing, (m["id"], missing)

    def test_id_is_md5_of_lower_cased_email(self, everyone: list[dict[str, Any]]) -> None:
        for m in everyone:
            assert m["id"] == hashlib.md5(m["email_address"].lower().encode()).hexdigest()

    def test_all_six_statuses_appear(self, everyone: list[dict[str, Any]]) -> None:
        assert {m["status"] for m in everyone} == set(STATUSES)

    def test_scalar_fields(self, sb: Sandbox, everyone: list[dict[str, Any]]) -> None:
        big = sb.client("client-1").list_ids[1]
        for m in everyone:
            assert re.fullmatch(r"[0-9a-f]{10}", m["unique_email_id"])
            assert re.fullmatch(r"[0-9a-f]{32}", m["contact_id"])
            assert isinstance(m["web_id"], int)
            assert m["email_type"] in ("html", "text")
            assert 1 <= m["member_rating"] <= 5
            assert isinstance(m["vip"], bool)
            assert isinstance(m["language"], str) and isinstance(m["source"], str)
            assert m["list_id"] == big
            assert m["tags_count"] == len(m["tags"])
            assert all(set(t) == {"id", "name"} for t in m["tags"])
            assert all(isinstance(v, bool) for v in m["interests"].values())
            assert {"avg_open_rate", "avg_click_rate"} <= set(m["stats"])
            assert {"latitude", "longitude", "country_code", "timezone"} <= set(m["location"])
            assert isinstance(m["full_name"], str)
        assert len({m["web_id"] for m in everyone}) == len(everyone)

    def test_merge_fields(self, everyone: list[dict[str, Any]]) -> None:
        address_kinds = set()
        for m in everyone:
            mf = m["merge_fields"]
            if not mf:
                continue
            assert {"FNAME", "LNAME", "ADDRESS", "PHONE", "BIRTHDAY"} <= set(mf)
            if isinstance(mf["ADDRESS"], dict):
                assert {"addr1", "addr2", "city", "state", "zip", "country"} <= set(mf["ADDRESS"])
                address_kinds.add("object")
            else:
                assert mf["ADDRESS"] == ""
                address_kinds.add("empty")
            assert mf["BIRTHDAY"] == "" or re.fullmatch(r"\d\d/\d\d", mf["BIRTHDAY"])
        assert address_kinds == {"object", "empty"}

    def test_timestamps_are_iso_with_offset_or_empty(self, everyone: list[dict[str, Any]]) -> None:
        empty: dict[str, int] = {"timestamp_signup": 0, "timestamp_opt": 0}
        for m in everyone:
            assert datetime.fromisoformat(m["last_changed"]).utcoffset() == timedelta(0)
            for name in empty:
                if m[name] == "":
                    empty[name] += 1
                    continue
                parsed = datetime.fromisoformat(m[name])
                assert parsed.utcoffset() == timedelta(0)
                assert m[name].endswith("+00:00")
            if m["status"] in ("pending", "transactional"):
                assert m["timestamp_opt"] == ""
            # An empty timestamp goes with an empty IP.
            assert (m["timestamp_signup"] == "") == (m["ip_signup"] == "")
        assert all(n > 0 for n in empty.values()), empty

    def test_links(self, everyone: list[dict[str, Any]]) -> None:
        for m in everyone[:50]:
            rels = {link["rel"]: link for link in m["_links"]}
            assert {"self", "parent", "update", "upsert", "delete"} <= set(rels)
            assert rels["self"]["href"].endswith(f"/lists/{m['list_id']}/members/{m['id']}")
            assert rels["self"]["method"] == "GET"

    def test_unsubscribed_members_carry_a_reason(self, everyone: list[dict[str, Any]]) -> None:
        unsubscribed = [m for m in everyone if m["status"] == "unsubscribed"]
        assert unsubscribed and all(m.get("unsubscribe_reason") for m in unsubscribed)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("path", "params", "headers", "status"),
    [
        ("/lists", None, {"Authorization": "Bearer 00000000000000000000000000000000-us6"}, 401),
        ("/lists", None, {}, 401),
        ("/lists/0123456789", None, None, 404),
        ("/no/such/endpoint", None, None, 404),
        ("/lists/{list}/members", {"status": "nope"}, None, 400),
    ],
)
def test_errors_are_problem_json(
    sb: Sandbox, small_list: str, path: str, params: Any, headers: Any, status: int
) -> None:
    kwargs = {"headers": headers} if headers is not None else {}
    r = mc_get(sb, path.format(list=small_list), params=params, **kwargs)
    body = assert_problem(r, status)
    assert body["type"].startswith("https://")
    assert body["title"]
