"""Mailchimp's official Python SDK against the sandbox: a client written by others reads it as it reads Mailchimp.

The SDK builds its URLs from `api_client.host` (`https://server.api.mailchimp.com/3.0`, with
"server" replaced by the datacenter); pointing `host` at the sandbox is the only change.
"""

from __future__ import annotations

import json
from typing import Any

import mailchimp_marketing as MailchimpMarketing
import pytest
from mailchimp_marketing.api_client import ApiClientError

from mc_pipeline.sandbox import Sandbox
from mc_pipeline_tests.sandbox.wire import all_members


def sdk(sb: Sandbox, config: dict[str, Any]) -> MailchimpMarketing.Client:
    client = MailchimpMarketing.Client()
    client.set_config(config)
    client.api_client.host = sb.mailchimp_url
    return client


@pytest.fixture(scope="module")
def client(sb: Sandbox) -> MailchimpMarketing.Client:
    return sdk(sb, {"api_key": sb.client("client-1").mailchimp_key, "server": "us6"})


def test_ping(client: MailchimpMarketing.Client) -> None:
    assert client.ping.get() == {"health_status": "Everything's Chimpy!"}


def test_get_all_lists(sb: Sandbox, client: MailchimpMarketing.Client) -> None:
    got = client.lists.get_all_lists()
    assert got["total_items"] == 2
    assert [x["id"] for x in got["lists"]] == list(sb.client("client-1").list_ids)
    for x in got["lists"]:
        assert x["stats"]["member_count"] == sb.mailchimp_list(x["id"]).counts()["subscribed"]
    one = client.lists.get_list(got["lists"][0]["id"])
    assert one == got["lists"][0]


def test_paging_a_whole_list(sb: Sandbox, client: MailchimpMarketing.Client, big_list: str) -> None:
    seen: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = client.lists.get_list_members_info(big_list, count=1000, offset=offset)
        assert page["list_id"] == big_list
        seen.extend(page["members"])
        offset += 1000
        if offset >= page["total_items"]:
            break
    ids = [m["id"] for m in seen]
    assert len(ids) == len(set(ids)) == page["total_items"]
    expected = {m["id"] for m in sb.mailchimp_list(big_list).members(include_archived=False)}
    assert set(ids) == expected
    assert "archived" not in {m["status"] for m in seen}
    # What the SDK parsed is what the wire carries.
    assert seen == all_members(sb, big_list)


def test_query_parameters_through_the_sdk(sb: Sandbox, client: MailchimpMarketing.Client, big_list: str) -> None:
    page = client.lists.get_list_members_info(
        big_list, count=50, fields=["members.id", "members.status", "members.last_changed", "total_items"]
    )
    assert set(page) == {"members", "total_items"}
    assert all(set(m) == {"id", "status", "last_changed"} for m in page["members"])
    archived = client.lists.get_list_members_info(big_list, status="archived", count=1000)
    assert archived["total_items"] == sb.mailchimp_list(big_list).counts()["archived"]
    assert {m["status"] for m in archived["members"]} == {"archived"}
    pivot = page["members"][0]["last_changed"]
    since = client.lists.get_list_members_info(
        big_list, since_last_changed=pivot, count=1000, fields=["members.last_changed", "total_items"]
    )
    assert all(m["last_changed"] > pivot for m in since["members"])
    ordered = client.lists.get_list_members_info(
        big_list, count=100, sort_field="last_changed", sort_dir="DESC", fields=["members.last_changed"]
    )
    stamps = [m["last_changed"] for m in ordered["members"]]
    assert stamps == sorted(stamps, reverse=True)
    member = client.lists.get_list_member(big_list, page["members"][0]["id"])
    assert member["id"] == page["members"][0]["id"]


def test_oauth_access_token_is_sent_as_bearer(sb: Sandbox) -> None:
    bearer = sdk(sb, {"access_token": sb.client("client-2").mailchimp_key, "server": "us6"})
    assert [x["id"] for x in bearer.lists.get_all_lists()["lists"]] == list(sb.client("client-2").list_ids)


def test_server_taken_from_the_key(sb: Sandbox) -> None:
    derived = sdk(sb, {"api_key": sb.client("client-1").mailchimp_key})
    assert derived.api_client.server == "us6"
    assert derived.ping.get()["health_status"] == "Everything's Chimpy!"


def test_errors_reach_the_sdk(sb: Sandbox, client: MailchimpMarketing.Client) -> None:
    with pytest.raises(ApiClientError) as missing:
        client.lists.get_list("0000000000")
    assert missing.value.status_code == 404
    assert json.loads(missing.value.text)["title"] == "Resource Not Found"
    with pytest.raises(ApiClientError) as denied:
        sdk(sb, {"api_key": "0" * 32 + "-us6"}).ping.get()
    assert denied.value.status_code == 401
    assert json.loads(denied.value.text)["title"] == "API Key Invalid"


def test_root_and_campaigns_as_connection_checks_read_them(client: MailchimpMarketing.Client) -> None:
    root = client.root.get_root()
    assert root["account_id"] == "client-1" and "account_timezone" in root and "contact" in root
    campaigns = client.campaigns.list(count=10, sort_field="create_time", sort_dir="ASC")
    assert campaigns["campaigns"] == [] and campaigns["total_items"] == 0


def test_filters_the_sdk_sends_are_applied(sb: Sandbox, client: MailchimpMarketing.Client, big_list: str) -> None:
    everyone = [m for m in sb.mailchimp_list(big_list).members() if m["status"] != "archived"]
    vip = client.lists.get_list_members_info(big_list, vip_only=True, count=1000, fields=["members.id", "total_items"])
    assert {m["id"] for m in vip["members"]} == {m["id"] for m in everyone if m["vip"]}
    text = client.lists.get_list_members_info(big_list, email_type="text", count=1000, fields=["total_items"])
    assert text["total_items"] == sum(m["email_type"] == "text" for m in everyone)
    naive = client.lists.get_list_members_info(
        big_list, since_last_changed="2025-06-01T00:00:00", fields=["total_items"]
    )
    utc = client.lists.get_list_members_info(
        big_list, since_last_changed="2025-06-01T00:00:00+00:00", fields=["total_items"]
    )
    assert naive["total_items"] == utc["total_items"] > 0
    with pytest.raises(ApiClientError) as refused:
        client.lists.get_list_members_info(big_list, since_last_campaign=True)
    assert refused.value.status_code == 400


def test_member_by_contact_id(client: MailchimpMarketing.Client, small_list: str) -> None:
    listed = client.lists.get_list_members_info(small_list, count=1)["members"][0]
    assert client.lists.get_list_member(small_list, listed["contact_id"]) == listed
