"""The sandbox as clients written by others meet it (issue 12, items 9-12): every documented query
parameter of the members listing, request ids, problem headers, 405s, and every documented field.

Against the session's read-only sandbox; the truth is the sandbox's own record of its members.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
import requests

from mc_pipeline.sandbox import Sandbox
from mc_pipeline.sandbox.member_query import DOCUMENTED
from mc_pipeline_tests.sandbox.wire import TIMEOUT, all_members, assert_problem, mc_get, members

PAGING = {"fields", "exclude_fields", "count", "offset"}


def truth(sb: Sandbox, list_id: str, status: str | None = None) -> list[dict[str, Any]]:
    everyone = sb.mailchimp_list(list_id).members(include_archived=True)
    if status is None:
        return [m for m in everyone if m["status"] != "archived"]
    return [m for m in everyone if m["status"] == status]


def ids(found: list[dict[str, Any]]) -> set[str]:
    return {m["id"] for m in found}


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def interests_of(sb: Sandbox, list_id: str) -> tuple[str, list[str]]:
    factory = sb.mailchimp_list(list_id).factory
    return factory.interest_category_id, factory.interest_ids


# Each case: parameters and the predicate over the sandbox's members (all statuses but archived,
# unless the case names a status) that the answer must equal exactly.
FILTERS: dict[str, tuple[dict[str, str], Any]] = {
    "vip_only": ({"vip_only": "true"}, lambda m: m["vip"]),
    "vip_only false": ({"vip_only": "false"}, lambda m: True),
    "email_type": ({"email_type": "text"}, lambda m: m["email_type"] == "text"),
    "since_timestamp_opt": (
        {"since_timestamp_opt": "2025-06-01T00:00:00+00:00"},
        lambda m: m["timestamp_opt"] != "" and ts(m["timestamp_opt"]) > ts("2025-06-01T00:00:00+00:00"),
    ),
    "before_timestamp_opt": (
        {"before_timestamp_opt": "2025-06-01T00:00:00+00:00"},
        lambda m: m["timestamp_opt"] != "" and ts(m["timestamp_opt"]) <= ts("2025-06-01T00:00:00+00:00"),
    ),
    "unsubscribed_since": (
        {"unsubscribed_since": "2025-06-01T00:00:00+00:00"},
        lambda m: m["status"] == "unsubscribed" and ts(m["last_changed"]) > ts("2025-06-01T00:00:00+00:00"),
    ),
    "since_last_campaign": ({"since_last_campaign": "true", "status": "cleaned"}, lambda m: m["status"] == "cleaned"),
}


class TestEveryDocumentedMemberParameter:
    @pytest.mark.parametrize("case", sorted(FILTERS))
    def test_filter_is_applied(self, sb: Sandbox, big_list: str, case: str) -> None:
        params, keep = FILTERS[case]
        expected = ids([m for m in truth(sb, big_list) if keep(m)])
        got = all_members(sb, big_list, fields="members.id,total_items", **params)
        assert ids(got) == expected
        assert len(got) == len(expected)
        assert 0 < len(expected) < 2500 or case == "vip_only false"

    def test_unique_email_id_finds_one_member(self, sb: Sandbox, big_list: str) -> None:
        target = truth(sb, big_list)[7]
        got = members(sb, big_list, unique_email_id=target["unique_email_id"], count=1000)
        assert [m["id"] for m in got["members"]] == [target["id"]]
        assert got["total_items"] == 1

    @pytest.mark.parametrize("match", ["any", "all", "none"])
    def test_interests(self, sb: Sandbox, big_list: str, match: str) -> None:
        category, interest_ids = interests_of(sb, big_list)
        wanted = interest_ids[:2]
        test = {"any": any, "all": all, "none": lambda xs: not any(xs)}[match]
        expected = ids([m for m in truth(sb, big_list) if test([m["interests"].get(i) for i in wanted])])
        params = {"interest_category_id": category, "interest_ids": ",".join(wanted), "interest_match": match}
        assert ids(all_members(sb, big_list, fields="members.id,total_items", **params)) == expected
        assert 0 < len(expected) < 2500

    def test_naive_time_filters_are_read_as_utc(self, sb: Sandbox, big_list: str) -> None:
        for name in ("since_last_changed", "before_last_changed", "since_timestamp_opt"):
            naive = members(sb, big_list, count=1, **{name: "2025-06-01T00:00:00"})["total_items"]
            utc = members(sb, big_list, count=1, **{name: "2025-06-01T00:00:00+00:00"})["total_items"]
            assert naive == utc > 0

    @pytest.mark.parametrize(
        "params",
        [
            {"vip_only": "maybe"},
            {"email_type": "pdf"},
            {"since_timestamp_opt": "last week"},
            {"before_timestamp_opt": "2025-02-30T00:00:00+00:00"},
            {"unsubscribed_since": "2025-01-01T00:00:00+00:00", "status": "subscribed"},
            {"unsubscribed_since": "soon"},
            {"since_last_campaign": "true"},  # needs a status
            {"since_last_campaign": "often", "status": "subscribed"},
            {"interest_match": "any"},  # without category and ids
            {"interest_category_id": "0000000000", "interest_ids": "a", "interest_match": "any"},
            {"interest_category_id": "{category}", "interest_ids": "{interest}", "interest_match": "some"},
        ],
    )
    def test_a_value_it_cannot_honour_is_a_400(self, sb: Sandbox, big_list: str, params: dict[str, str]) -> None:
        category, interest_ids = interests_of(sb, big_list)
        filled = {k: v.format(category=category, interest=interest_ids[0]) for k, v in params.items()}
        assert_problem(mc_get(sb, f"/lists/{big_list}/members", params=filled), 400, "Invalid Resource")

    def test_every_documented_parameter_is_covered_here(self) -> None:
        covered = {p for params, _ in FILTERS.values() for p in params}
        covered |= {"unique_email_id", "interest_category_id", "interest_ids", "interest_match"}
        covered |= {"since_last_changed", "before_last_changed", "status", "sort_field", "sort_dir"}  # wire tests
        assert covered | PAGING == DOCUMENTED


class TestRequestIdsAndProblems:
    @pytest.mark.parametrize(
        ("method", "path", "auth", "status"),
        [
            ("GET", "/ping", True, 200),
            ("GET", "/lists/{list}/members", True, 200),
            ("GET", "/lists", False, 401),
            ("GET", "/lists/0000000000", True, 404),
            ("GET", "/no/such/thing", True, 404),
            ("POST", "/lists", True, 405),
            ("DELETE", "/lists/{list}/members", True, 405),
            ("GET", "/lists/{list}/members?vip_only=perhaps", True, 400),
        ],
    )
    def test_every_answer_has_a_request_id(
        self, sb: Sandbox, small_list: str, method: str, path: str, auth: bool, status: int
    ) -> None:
        key = ("x", sb.client("client-1").mailchimp_key) if auth else None
        r = requests.request(method, sb.mailchimp_url + path.format(list=small_list), auth=key, timeout=TIMEOUT)
        assert r.status_code == status
        request_id = r.headers["X-Request-Id"]
        assert len(request_id) >= 32
        if status >= 400:
            body = assert_problem(r, status)
            assert body["instance"] == request_id
            assert r.headers["Link"].endswith('/schema/3.0/ProblemDetailDocument.json>; rel="describedBy"')
            assert r.headers["Link"].startswith("<https://")

    def test_request_ids_differ(self, sb: Sandbox) -> None:
        assert mc_get(sb, "/ping").headers["X-Request-Id"] != mc_get(sb, "/ping").headers["X-Request-Id"]

    def test_wrong_method_is_405_with_allow(self, sb: Sandbox, small_list: str) -> None:
        key = ("x", sb.client("client-1").mailchimp_key)
        r = requests.put(f"{sb.mailchimp_url}/lists/{small_list}", auth=key, timeout=TIMEOUT)
        assert_problem(r, 405, "Method Not Allowed")
        assert set(r.headers["Allow"].split(",")) == {"GET", "HEAD"}


class TestDocumentedFields:
    def test_api_root(self, sb: Sandbox) -> None:
        root = mc_get(sb, "/").json()
        expected = {"account_id", "login_id", "account_name", "email", "first_name", "last_name", "username"}
        expected |= {"avatar_url", "role", "member_since", "pricing_plan_type", "first_payment", "account_timezone"}
        expected |= {"account_industry", "contact", "pro_enabled", "last_login", "total_subscribers"}
        expected |= {"industry_stats", "_links"}
        assert expected <= set(root)
        assert {"company", "addr1", "addr2", "city", "state", "zip", "country"} <= set(root["contact"])
        assert set(root["industry_stats"]) == {"open_rate", "bounce_rate", "click_rate"}

    def test_lists(self, sb: Sandbox, big_list: str) -> None:
        lst = mc_get(sb, f"/lists/{big_list}").json()
        expected = {"notify_on_subscribe", "notify_on_unsubscribe", "subscribe_url_short", "subscribe_url_long"}
        expected |= {"beamer_address", "modules", "contact", "campaign_defaults", "stats", "_links"}
        assert expected <= set(lst)
        assert lst["subscribe_url_long"].startswith("https://") and big_list in lst["subscribe_url_long"]
        assert lst["subscribe_url_short"].startswith("http://eepurl.com/")
        stats = {"member_count", "total_contacts", "unsubscribe_count", "cleaned_count", "member_count_since_send"}
        stats |= {"unsubscribe_count_since_send", "cleaned_count_since_send", "campaign_count", "campaign_last_sent"}
        stats |= {"merge_field_count", "avg_sub_rate", "avg_unsub_rate", "target_sub_rate", "open_rate"}
        stats |= {"click_rate", "last_sub_date", "last_unsub_date"}
        assert set(lst["stats"]) == stats
        assert lst["stats"]["total_contacts"] == len(sb.mailchimp_list(big_list))
        newest = max(m["timestamp_opt"] for m in truth(sb, big_list, "subscribed"))
        assert ts(lst["stats"]["last_sub_date"]) == ts(newest)
        assert {"address1", "address2"} <= set(lst["contact"])

    def test_members_carry_the_sms_fields(self, sb: Sandbox, small_list: str) -> None:
        for m in members(sb, small_list, count=20)["members"]:
            assert {"sms_phone_number", "sms_subscription_status", "sms_subscription_last_updated"} <= set(m)
            assert m["consents_to_one_to_one_messaging"] in (True, False)

    def test_a_member_by_contact_id_hash_or_email(self, sb: Sandbox, small_list: str) -> None:
        listed = members(sb, small_list, count=1)["members"][0]
        keys = (listed["id"], listed["contact_id"], listed["email_address"])
        assert [mc_get(sb, f"/lists/{small_list}/members/{k}").json() for k in keys] == [listed] * 3
        assert listed["contact_id"] != listed["id"]

    def test_campaigns(self, sb: Sandbox) -> None:
        r = mc_get(sb, "/campaigns", params={"count": 10, "sort_field": "create_time", "sort_dir": "ASC"})
        assert r.status_code == 200
        body = r.json()
        assert body["campaigns"] == [] and body["total_items"] == 0
        assert_problem(mc_get(sb, "/campaigns", headers={}), 401)
