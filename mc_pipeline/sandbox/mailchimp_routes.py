"""The sandbox's Mailchimp Marketing API v3 (mounted under /3.0): the read endpoints a sync uses.

Handlers only answer; auth, the connection limit, faults, latency, accounting and problem
documents are the sub-application's middlewares (sandbox/middlewares.py).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from mc_pipeline.sandbox.fields import excluded_subtree, parse_paths, project, subtree
from mc_pipeline.sandbox.generate import iso
from mc_pipeline.sandbox.mailchimp import (
    SORT_FIELDS,
    STATUS_CODE,
    MailchimpList,
    MailchimpProblem,
    MemberQuery,
    SandboxMailchimpAccount,
    parse_time,
)
from mc_pipeline.sandbox.middlewares import (
    accounting,
    json_bytes,
    latency,
    mailchimp_account,
    mailchimp_authentication,
    mailchimp_connection_limit,
    mailchimp_faults,
    mailchimp_problems,
    response_bytes,
)
from mc_pipeline.sandbox.state import ACCOUNT

routes = web.RouteTableDef()


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
    counts = lst.counts()
    return {
        "id": lst.id,
        "web_id": lst.web_id,
        "name": lst.name,
        "contact": {
            "company": lst.account.client_id.title(),
            "address1": "1 Sandbox Way",
            "city": "London",
            "state": "",
            "zip": "EC1A 1BB",
            "country": "GB",
            "phone": "",
        },
        "permission_reminder": "You signed up on our website.",
        "use_archive_bar": True,
        "campaign_defaults": {
            "from_name": lst.account.client_id.title(),
            "from_email": "news@example.org",
            "subject": "",
            "language": "en",
        },
        "date_created": iso(lst.created),
        "list_rating": 3,
        "email_type_option": False,
        "visibility": "prv",
        "double_optin": False,
        "has_welcome": False,
        "marketing_permissions": False,
        "stats": {
            "member_count": counts["subscribed"],
            "unsubscribe_count": counts["unsubscribed"],
            "cleaned_count": counts["cleaned"],
            "member_count_since_send": counts["subscribed"],
            "unsubscribe_count_since_send": 0,
            "cleaned_count_since_send": 0,
            "campaign_count": 0,
            "avg_sub_rate": 0,
            "avg_unsub_rate": 0,
            "target_sub_rate": 0,
            "open_rate": 0,
            "click_rate": 0,
        },
        "_links": _list_links(lst.account.dc, f"/lists/{lst.id}"),
    }


@routes.get("/")
async def api_root(request: web.Request) -> web.Response:
    account: SandboxMailchimpAccount = request[ACCOUNT]
    body = {
        "account_id": account.client_id,
        "account_name": account.client_id.title(),
        "login_id": account.client_id,
        "role": "owner",
        "total_subscribers": sum(len(lst) for lst in account.lists.values()),
    }
    return json_bytes(orjson.dumps(body))


@routes.get("/ping")
async def ping(request: web.Request) -> web.Response:
    return json_bytes(b'{"health_status":"Everything\'s Chimpy!"}')


@routes.get("/lists")
async def all_lists(request: web.Request) -> web.Response:
    account: SandboxMailchimpAccount = request[ACCOUNT]
    count, offset = _paging(request)
    lists = list(account.ordered_lists())
    fields = parse_paths(request.query.get("fields"))
    excluded = parse_paths(request.query.get("exclude_fields"))
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
    fields = parse_paths(request.query.get("fields"))
    excluded = parse_paths(request.query.get("exclude_fields"))
    return json_bytes(orjson.dumps(project(list_resource(lst), fields, excluded)))


@routes.get("/lists/{list_id}/members")
async def list_members(request: web.Request) -> web.Response:
    account: SandboxMailchimpAccount = request[ACCOUNT]
    lst = account.list(request.match_info["list_id"])
    count, offset = _paging(request)
    q = request.query
    status = q.get("status") or None
    if status is not None and status not in STATUS_CODE:
        raise MailchimpProblem(400, "Invalid Resource", f"status must be one of {list(STATUS_CODE)}, not {status!r}.")
    sort_field = q.get("sort_field") or None
    if sort_field is not None and sort_field not in SORT_FIELDS:
        raise MailchimpProblem(400, "Invalid Resource", f"sort_field must be one of {list(SORT_FIELDS)}.")
    sort_dir = (q.get("sort_dir") or "ASC").upper()
    if sort_dir not in ("ASC", "DESC"):
        raise MailchimpProblem(400, "Invalid Resource", "sort_dir must be ASC or DESC.")
    query = MemberQuery(
        status=status,
        since_last_changed=parse_time(q.get("since_last_changed"), "since_last_changed"),
        before_last_changed=parse_time(q.get("before_last_changed"), "before_last_changed"),
        sort_field=sort_field,
        sort_dir=sort_dir,
    )
    fields = parse_paths(q.get("fields"))
    excluded = parse_paths(q.get("exclude_fields"))
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
    fields = parse_paths(request.query.get("fields"))
    excluded = parse_paths(request.query.get("exclude_fields"))
    return json_bytes(orjson.dumps(project(member, fields, excluded)))


def mailchimp_app() -> web.Application:
    app = web.Application(
        middlewares=[
            accounting("mailchimp", mailchimp_account),
            mailchimp_authentication,
            mailchimp_connection_limit,
            latency(lambda state: state.config.mailchimp.latency, response_bytes),
            mailchimp_faults,
            mailchimp_problems,
        ]
    )
    app.add_routes(routes)
    return app
