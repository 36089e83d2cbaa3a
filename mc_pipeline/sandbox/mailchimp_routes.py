"""The sandbox's Mailchimp Marketing API v3 (mounted under /3.0): the read endpoints a sync uses.

Handlers only answer; auth, the connection limit, faults, latency, accounting and problem
documents are the sub-application's middlewares (sandbox/middlewares.py).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from mc_pipeline.sandbox.config import derive_hex
from mc_pipeline.sandbox.fields import Tree, excluded_subtree, parse_paths, project, subtree
from mc_pipeline.sandbox.generate import iso
from mc_pipeline.sandbox.mailchimp import MailchimpList, MailchimpProblem, SandboxMailchimpAccount
from mc_pipeline.sandbox.member_query import member_query
from mc_pipeline.sandbox.middlewares import (
    accounting,
    in_flight,
    json_bytes,
    latency,
    mailchimp_account,
    mailchimp_authentication,
    mailchimp_faults,
    mailchimp_problems,
    mailchimp_request_id,
    response_bytes,
    too_many_connections,
)
from mc_pipeline.sandbox.state import ACCOUNT

routes = web.RouteTableDef()
_BASE_MERGE_FIELDS = 5  # FNAME, LNAME, ADDRESS, PHONE, BIRTHDAY (sandbox/generate.py)


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise MailchimpProblem(400, "Invalid Resource", f"{name} must be an integer, not {raw!r}.") from None
    if value < 0:
        raise MailchimpProblem(400, "Invalid Resource", f"{name} must not be negative.")
    return value


def _projection(request: web.Request) -> tuple[Tree | None, Tree | None]:
    """The `fields` and `exclude_fields` of a request."""
    return parse_paths(request.query.get("fields")), parse_paths(request.query.get("exclude_fields"))


def _paging(request: web.Request) -> tuple[int, int]:
    return min(_int_param(request, "count", 10), 1000), _int_param(request, "offset", 0)


def _collection_body(
    parts: dict[str, Any], members_key: str, members: list[bytes] | None, fields: Any, excluded: Any
) -> bytes:
    """A collection response with pre-serialised members spliced in, top-level keys projected."""
    chunks: list[bytes] = []
    for name, value in parts.items():
        if name == members_key:
            if members is not None:
                chunks.append(b'"' + members_key.encode() + b'":[' + b",".join(members) + b"]")
            continue
        keep, sub = subtree(fields, name)
        if not keep:
            continue
        keep, xsub = excluded_subtree(excluded, name)
        if not keep:
            continue
        chunks.append(orjson.dumps(name) + b":" + orjson.dumps(project(value, sub, xsub)))
    return b"{" + b",".join(chunks) + b"}"


def _list_links(dc: str, path: str) -> list[dict[str, str]]:
    base = f"https://{dc}.api.mailchimp.com/3.0{path}"
    return [
        {"rel": "self", "href": base, "method": "GET"},
        {"rel": "parent", "href": base.rsplit("/", 1)[0], "method": "GET"},
    ]


def list_resource(lst: MailchimpList) -> dict[str, Any]:
    """A list with every field of the documented schema (subscribe URLs, notify settings, stats)."""
    counts = lst.counts()
    client, dc = lst.account.client_id, lst.account.dc
    user = derive_hex(0, "user", client, n=25)
    return {
        "id": lst.id,
        "web_id": lst.web_id,
        "name": lst.name,
        "contact": {
            "company": client.title(),
            "address1": "1 Sandbox Way",
            "address2": "",
            "city": "London",
            "state": "",
            "zip": "EC1A 1BB",
            "country": "GB",
            "phone": "",
        },
        "permission_reminder": "You signed up on our website.",
        "use_archive_bar": True,
        "campaign_defaults": {
            "from_name": client.title(),
            "from_email": "news@example.org",
            "subject": "",
            "language": "en",
        },
        "notify_on_subscribe": "",
        "notify_on_unsubscribe": "",
        "date_created": iso(lst.created),
        "list_rating": 3,
        "email_type_option": False,
        "subscribe_url_short": f"http://eepurl.com/{_base36(lst.web_id)}",
        "subscribe_url_long": f"https://{client}.{dc}.list-manage.com/subscribe?u={user}&id={lst.id}",
        "beamer_address": f"{dc}-{lst.id}-{derive_hex(0, 'beamer', lst.id, n=10)}@inbound.mailchimp.com",
        "visibility": "prv",
        "double_optin": False,
        "has_welcome": False,
        "marketing_permissions": False,
        "modules": [],
        "stats": {
            "member_count": counts["subscribed"],
            "total_contacts": sum(counts.values()),
            "unsubscribe_count": counts["unsubscribed"],
            "cleaned_count": counts["cleaned"],
            "member_count_since_send": counts["subscribed"],
            "unsubscribe_count_since_send": 0,
            "cleaned_count_since_send": 0,
            "campaign_count": 0,
            "campaign_last_sent": "",
            "merge_field_count": _BASE_MERGE_FIELDS + len(lst.factory.extra_merge),
            "avg_sub_rate": 0,
            "avg_unsub_rate": 0,
            "target_sub_rate": 0,
            "open_rate": 0,
            "click_rate": 0,
            "last_sub_date": lst.latest("subscribed", "timestamp_opt"),
            "last_unsub_date": lst.latest("unsubscribed", "last_changed"),
        },
        "_links": _list_links(dc, f"/lists/{lst.id}"),
    }


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


@routes.get("/")
async def api_root(request: web.Request) -> web.Response:
    """The account, with every field of the documented API root."""
    account: SandboxMailchimpAccount = request[ACCOUNT]
    client = account.client_id
    first_list = min((lst.created for lst in account.lists.values()), default=0)
    body = {
        "account_id": client,
        "login_id": client,
        "account_name": client.title(),
        "email": f"owner@{client}.example.org",
        "first_name": client.title(),
        "last_name": "Owner",
        "username": client,
        "avatar_url": "",
        "role": "owner",
        "member_since": iso(first_list),
        "pricing_plan_type": "monthly",
        "first_payment": iso(first_list),
        "account_timezone": "Europe/London",
        "account_industry": "Retail",
        "contact": {
            "company": client.title(),
            "addr1": "1 Sandbox Way",
            "addr2": "",
            "city": "London",
            "state": "",
            "zip": "EC1A 1BB",
            "country": "GB",
        },
        "pro_enabled": False,
        "last_login": iso(first_list),
        "total_subscribers": sum(len(lst) for lst in account.lists.values()),
        "industry_stats": {"open_rate": 0, "bounce_rate": 0, "click_rate": 0},
        "_links": _list_links(account.dc, "/")[:1],
    }
    return json_bytes(orjson.dumps(project(body, *_projection(request))))


@routes.get("/ping")
async def ping(request: web.Request) -> web.Response:
    return json_bytes(b'{"health_status":"Everything\'s Chimpy!"}')


@routes.get("/lists")
async def all_lists(request: web.Request) -> web.Response:
    account: SandboxMailchimpAccount = request[ACCOUNT]
    count, offset = _paging(request)
    lists = list(account.ordered_lists())
    fields, excluded = _projection(request)
    keep, sub = subtree(fields, "lists")
    keep_x, xsub = excluded_subtree(excluded, "lists")
    page = None
    if keep and keep_x:
        page = [orjson.dumps(project(list_resource(lst), sub, xsub)) for lst in lists[offset : offset + count]]
    parts = {
        "lists": None,
        "total_items": len(lists),
        "constraints": {"may_create": True, "max_instances": 100, "current_total_instances": len(lists)},
        "_links": _list_links(account.dc, "/lists"),
    }
    return json_bytes(_collection_body(parts, "lists", page, fields, excluded))


@routes.get("/lists/{list_id}")
async def one_list(request: web.Request) -> web.Response:
    account: SandboxMailchimpAccount = request[ACCOUNT]
    lst = account.list(request.match_info["list_id"])
    fields, excluded = _projection(request)
    return json_bytes(orjson.dumps(project(list_resource(lst), fields, excluded)))


@routes.get("/lists/{list_id}/members")
async def list_members(request: web.Request) -> web.Response:
    account: SandboxMailchimpAccount = request[ACCOUNT]
    lst = account.list(request.match_info["list_id"])
    count, offset = _paging(request)
    query = member_query(request.query, lst.factory.interest_category_id)
    fields, excluded = _projection(request)
    slots = lst.select(query)
    keep, msub = subtree(fields, "members")
    keep_x, mxsub = excluded_subtree(excluded, "members")
    members = lst.serialized(slots[offset : offset + count], msub, mxsub) if keep and keep_x else None
    parts = {
        "members": None,
        "list_id": lst.id,
        "total_items": len(slots),
        "_links": _list_links(account.dc, f"/lists/{lst.id}/members"),
    }
    return json_bytes(_collection_body(parts, "members", members, fields, excluded))


@routes.get("/lists/{list_id}/members/{subscriber_hash}")
async def one_member(request: web.Request) -> web.Response:
    account: SandboxMailchimpAccount = request[ACCOUNT]
    lst = account.list(request.match_info["list_id"])
    member = lst.get(request.match_info["subscriber_hash"])
    fields, excluded = _projection(request)
    return json_bytes(orjson.dumps(project(member, fields, excluded)))


@routes.get("/campaigns")
async def campaigns(request: web.Request) -> web.Response:
    """No campaign is ever sent from the sandbox: an empty collection (connection checks read it)."""
    account: SandboxMailchimpAccount = request[ACCOUNT]
    _paging(request)
    fields, excluded = _projection(request)
    parts = {"campaigns": None, "total_items": 0, "_links": _list_links(account.dc, "/campaigns")}
    return json_bytes(_collection_body(parts, "campaigns", [], fields, excluded))


def mailchimp_app() -> web.Application:
    app = web.Application(
        middlewares=[
            mailchimp_request_id,
            accounting("mailchimp", mailchimp_account),
            mailchimp_authentication,
            in_flight(lambda state: state.config.mailchimp.max_in_flight, too_many_connections),
            latency(lambda state: state.config.mailchimp.latency, response_bytes),
            mailchimp_faults,
            mailchimp_problems,
        ]
    )
    app.add_routes(routes)
    return app
