"""The sandbox's HTTP server (aiohttp): Mailchimp under /3.0, Ometria under /v2, admin under /_sandbox.

Every answer goes through `_send`, which applies the latency model, faults, and the per-key
in-flight accounting, so a client sees the same wire behaviour whatever endpoint it calls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from mc_pipeline.sandbox.clock import SandboxClock
from mc_pipeline.sandbox.config import Faults, Latency, SandboxConfig
from mc_pipeline.sandbox.faults import FaultPlan
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
from mc_pipeline.sandbox.ometria import PushRejected, SandboxOmetriaAccount, check_batch
from mc_pipeline.sandbox.stats import RequestRecord, Stats

log = logging.getLogger("mc_pipeline.sandbox")
ERROR_DOC = "https://mailchimp.com/developer/marketing/docs/errors/"
PROBLEM_JSON = "application/problem+json; charset=utf-8"
JSON = "application/json; charset=utf-8"
UNKNOWN = "<unknown>"
_AKAMAI_403 = (
    b"<HTML><HEAD><TITLE>Access Denied</TITLE></HEAD><BODY><H1>Access Denied</H1>"
    b"You don't have permission to access this server.<P>Reference #18.sandbox</BODY></HTML>"
)
_GATEWAY_504 = b"<html><body><h1>504 Gateway Time-out</h1>The server didn't respond in time.</body></html>"


class DroppedConnection(Exception):
    """Raised after aborting the transport: the client gets no answer at all."""


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] | None = None


class SandboxState:
    """Everything the handlers share. Built once from the config; tests reach it through `Sandbox`."""

    def __init__(self, config: SandboxConfig, clock: SandboxClock | None = None) -> None:
        from mc_pipeline.sandbox.generate import MemberFactory

        self.config = config
        self.clock = clock or SandboxClock()
        self.stats = Stats()
        self.faults = FaultPlan(config.seed, {"mailchimp": config.mailchimp.faults, "ometria": config.ometria.faults})
        self.mc_by_key: dict[str, SandboxMailchimpAccount] = {}
        self.mc_by_client: dict[str, SandboxMailchimpAccount] = {}
        self.om_by_key: dict[str, SandboxOmetriaAccount] = {}
        self.om_by_client: dict[str, SandboxOmetriaAccount] = {}
        self.lists: dict[str, MailchimpList] = {}
        # Generated members end at least a day before start-up so a run's window includes all of
        # them. The epoch is a UTC midnight, not the start-up second: two sandboxes with the same
        # seed started the same day serve identical members, timestamps included.
        epoch = self.clock.now_s() // 86400 * 86400 - 86400
        for acc in config.accounts:
            assert acc.mailchimp_key and acc.ometria_key  # filled by the config's validator
            mc = SandboxMailchimpAccount(client_id=acc.client_id, api_key=acc.mailchimp_key, dc=acc.dc)
            for n, spec in enumerate(acc.lists):
                assert spec.id and spec.name
                factory = MemberFactory(config.seed, spec.id, acc.dc, epoch)
                lst = MailchimpList(mc, spec.id, spec.name, factory, spec.members, created=epoch - 400 * 86400 + n)
                mc.lists[spec.id] = lst
                self.lists[spec.id] = lst
                if spec.faults is not None:
                    self.faults.set_rates(spec.id, spec.faults)
            self.mc_by_key[mc.api_key] = mc
            self.mc_by_client[acc.client_id] = mc
            om = SandboxOmetriaAccount(client_id=acc.client_id, api_key=acc.ometria_key, settings=config.ometria)
            self.om_by_key[om.api_key] = om
            self.om_by_client[acc.client_id] = om

    def add_list(self, client_id: str, list_id: str, name: str, members: int) -> MailchimpList:
        from mc_pipeline.sandbox.generate import MemberFactory

        mc = self.mc_by_client[client_id]
        if list_id in self.lists:
            raise ValueError(f"list {list_id} exists")
        factory = MemberFactory(self.config.seed, list_id, mc.dc, self.clock.now_s() - 60)
        lst = MailchimpList(mc, list_id, name, factory, members, created=self.clock.now_s())
        mc.lists[list_id] = lst
        self.lists[list_id] = lst
        return lst


STATE = web.AppKey("state", SandboxState)


# ---------------------------------------------------------------------------- wire helpers
def problem(status: int, title: str, detail: str, instance: str | None = None) -> Reply:
    body = {
        "type": ERROR_DOC,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance or str(uuid.uuid4()),
    }
    return Reply(status, orjson.dumps(body), PROBLEM_JSON)


def ometria_error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps({"status": "ERROR", "message": message}), JSON, headers)


def mailchimp_key(request: web.Request) -> str | None:
    """HTTP Basic (any user, key as password) or Bearer, as the real API accepts."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip() or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep else None
    return None


async def _write(
    request: web.Request, reply: Reply, fault: str | None, record: Callable[[int, int], None]
) -> web.StreamResponse:
    """Send `reply` as faulted. `record(status, body_bytes)` is called before the client can see
    anything, so a test that has its answer also finds the request in the stats."""
    body = reply.body
    if fault == "truncate" and reply.status == 200 and len(body) > 2:
        body = body[: max(1, len(body) // 2)]
    if fault in ("drop", "store_then_drop"):
        record(0, 0)
        if request.transport is not None:
            request.transport.abort()
        raise DroppedConnection
    record(reply.status, len(body))
    resp = web.StreamResponse(status=reply.status, headers=reply.headers or {})
    resp.content_type = reply.content_type.split(";")[0]
    resp.charset = "utf-8" if "charset" in reply.content_type else None
    resp.content_length = len(body)
    # The sandbox's clock, not the wall's: clients may take "now" from here, as from a real server.
    now = request.app[STATE].clock.now()
    resp.headers["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
    try:
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
    except ConnectionError:
        pass  # the client hung up first
    return resp


def _sleep_time(latency: Latency, nbytes: int, state: SandboxState, spent: float = 0.0) -> float:
    """What is left of the modelled latency once the sandbox's own `spent` seconds of work are
    counted: the model is the whole answer time, as a client sees it, not the model plus our CPU."""
    modelled = latency.seconds(nbytes, state.faults._rng.random() if latency.jitter_ms else 0.0)
    return max(0.0, modelled - spent)


# ---------------------------------------------------------------------------- Mailchimp
MailchimpHandler = Callable[[web.Request, SandboxMailchimpAccount], Awaitable[Reply]]


def mailchimp_route(route: str, scope: Callable[[web.Request], str | None] | None = None):
    """Wraps a Mailchimp handler with auth, the per-key connection limit, faults and latency."""

    def wrap(handler: MailchimpHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def endpoint(request: web.Request) -> web.StreamResponse:
            state: SandboxState = request.app[STATE]
            settings = state.config.mailchimp
            started = time.monotonic()
            key = mailchimp_key(request)
            account = state.mc_by_key.get(key) if key else None
            label = f"mailchimp:{account.client_id}" if account else f"mailchimp:{UNKNOWN}"
            fault: str | None = None
            entered = False
            recorded = False

            def record(status: int, sent: int) -> None:
                nonlocal recorded
                if not recorded:
                    recorded = True
                    _record(state, label, request, route, status, sent, started, fault)

            try:
                if key is None:
                    reply = problem(401, "API Key Missing", "Your request did not include an API key.")
                elif account is None:
                    reply = problem(
                        401,
                        "API Key Invalid",
                        "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
                    )
                elif account.revoked:
                    reply = problem(403, "User Disabled", "This account has been disabled.")
                else:
                    entered = state.stats.try_enter(label, settings.max_in_flight)
                    if not entered:
                        reply = problem(
                            429,
                            "Too Many Requests",
                            f"You have exceeded the limit of {settings.max_in_flight} simultaneous connections.",
                        )
                    else:
                        list_id = scope(request) if scope else None
                        targets = (list_id, "mailchimp") if list_id else ("mailchimp",)
                        kind, rates = state.faults.draw(targets)
                        fault = kind
                        reply = await _mailchimp_fault(kind, rates) if kind else None
                        if reply is None:
                            try:
                                reply = await handler(request, account)
                            except MailchimpProblem as exc:
                                reply = problem(exc.status, exc.title, exc.detail)
                        spent = time.monotonic() - started
                        if kind == "slow":
                            await asyncio.sleep(rates.slow_delay_s)
                        await asyncio.sleep(_sleep_time(settings.latency, len(reply.body), state, spent))
                return await _write(request, reply, fault, record)
            except DroppedConnection:
                return web.Response()  # never sent: the transport is gone
            except asyncio.CancelledError:  # the client gave up (e.g. its timeout) before the answer
                record(0, 0)
                raise
            finally:
                if entered:
                    state.stats.leave(label)

        return endpoint

    return wrap


async def _mailchimp_fault(kind: str, rates: Faults) -> Reply | None:
    if kind == "500":
        return problem(500, "Internal Server Error", "An unexpected internal error has occurred.")
    if kind == "503":
        return problem(503, "Service Unavailable", "The service is temporarily unavailable. Try again later.")
    if kind == "504":
        await asyncio.sleep(rates.gateway_delay_s)
        return Reply(504, _GATEWAY_504, "text/html")
    if kind == "429":
        return problem(429, "Too Many Requests", "You have exceeded the limit of 10 simultaneous connections.")
    if kind == "403_throttle":
        return Reply(403, _AKAMAI_403, "text/html")
    return None  # drop / truncate / slow act on the way out


def _record(
    state: SandboxState,
    label: str,
    request: web.Request,
    route: str,
    status: int,
    sent: int,
    started: float,
    fault: str | None,
    received: int = 0,
) -> None:
    state.stats.record(
        label,
        RequestRecord(
            request.method, route, request.path, dict(request.query), status, sent, started, time.monotonic(), fault
        ),
        received,
    )


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


@mailchimp_route("/3.0/")
async def mc_root(request: web.Request, account: SandboxMailchimpAccount) -> Reply:
    body = {
        "account_id": account.client_id,
        "account_name": account.client_id.title(),
        "login_id": account.client_id,
        "role": "owner",
        "total_subscribers": sum(len(lst) for lst in account.lists.values()),
    }
    return Reply(200, orjson.dumps(body))


@mailchimp_route("/3.0/ping")
async def mc_ping(request: web.Request, account: SandboxMailchimpAccount) -> Reply:
    return Reply(200, b'{"health_status":"Everything\'s Chimpy!"}')


@mailchimp_route("/3.0/lists")
async def mc_lists(request: web.Request, account: SandboxMailchimpAccount) -> Reply:
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
    return Reply(200, _collection_body(parts, "lists", page, fields, excluded))


@mailchimp_route("/3.0/lists/{list_id}", scope=lambda r: r.match_info["list_id"])
async def mc_list(request: web.Request, account: SandboxMailchimpAccount) -> Reply:
    lst = account.list(request.match_info["list_id"])
    fields = parse_paths(request.query.get("fields"))
    excluded = parse_paths(request.query.get("exclude_fields"))
    return Reply(200, orjson.dumps(project(list_resource(lst), fields, excluded)))


@mailchimp_route("/3.0/lists/{list_id}/members", scope=lambda r: r.match_info["list_id"])
async def mc_members(request: web.Request, account: SandboxMailchimpAccount) -> Reply:
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
    return Reply(200, _collection_body(parts, "members", members, fields, excluded))


@mailchimp_route("/3.0/lists/{list_id}/members/{subscriber_hash}", scope=lambda r: r.match_info["list_id"])
async def mc_member(request: web.Request, account: SandboxMailchimpAccount) -> Reply:
    lst = account.list(request.match_info["list_id"])
    member = lst.get(request.match_info["subscriber_hash"])
    fields = parse_paths(request.query.get("fields"))
    excluded = parse_paths(request.query.get("exclude_fields"))
    return Reply(200, orjson.dumps(project(member, fields, excluded)))


async def mc_not_found(request: web.Request) -> web.StreamResponse:
    reply = problem(404, "Resource Not Found", "The requested resource could not be found.")
    return web.Response(status=404, body=reply.body, content_type="application/problem+json")


# ---------------------------------------------------------------------------- Ometria
async def om_push(request: web.Request) -> web.StreamResponse:
    state: SandboxState = request.app[STATE]
    settings = state.config.ometria
    started = time.monotonic()
    key = request.headers.get("X-Ometria-Auth")
    account = state.om_by_key.get(key) if key else None
    label = f"ometria:{account.client_id}" if account else f"ometria:{UNKNOWN}"
    raw = await request.read()
    fault: str | None = None
    recorded = False

    def record(status: int, sent: int) -> None:
        nonlocal recorded
        if not recorded:
            recorded = True
            _record(state, label, request, "/v2/push", status, sent, started, fault, len(raw))

    state.stats.enter(label)
    try:
        if account is None:
            reply = ometria_error(401, "Unauthorized: missing or unknown X-Ometria-Auth key.")
        elif account.revoked:
            reply = ometria_error(403, "Forbidden: this API key has been revoked.")
        else:
            reply, fault = await _om_admitted(state, account, raw)
        spent = time.monotonic() - started
        if fault in ("slow", "store_then_slow"):
            rates = state.faults.rates(account.client_id) if account else None
            await asyncio.sleep((rates or state.config.ometria.faults).slow_delay_s)
        await asyncio.sleep(_sleep_time(settings.latency, len(raw), state, spent))
        return await _write(request, reply, fault, record)
    except DroppedConnection:
        return web.Response()  # never sent: the transport is gone
    except asyncio.CancelledError:  # the client gave up (e.g. its timeout) before the answer
        record(0, 0)
        raise
    finally:
        state.stats.leave(label)


async def _om_admitted(state: SandboxState, account: SandboxOmetriaAccount, raw: bytes) -> tuple[Reply, str | None]:
    settings = state.config.ometria
    wait = account.admit()
    queue_headers = {
        "X-QueueSize-Limit": str(settings.backlog_limit),
        "X-QueueSize-Remaining": str(max(0, settings.backlog_limit - account.backlog())),
    }
    if wait is not None:
        return ometria_error(
            429,
            f"Too many requests: the limit is {settings.rate_per_second} requests per second.",
            {**queue_headers, "Retry-After": str(max(1, int(wait + 0.999)))},
        ), None
    kind, _ = state.faults.draw((account.client_id, "ometria"))
    if kind in ("500", "503"):
        return ometria_error(int(kind), "Internal error, please retry."), kind
    if kind == "504":
        await asyncio.sleep((state.faults.rates(account.client_id) or settings.faults).gateway_delay_s)
        return Reply(504, _GATEWAY_504, "text/html"), kind
    if kind == "429":
        return ometria_error(429, "Too many requests.", {**queue_headers, "Retry-After": "1"}), kind
    if kind == "402":
        return ometria_error(402, "Quota exceeded: this account's monthly contact allowance is used up."), kind
    if kind == "drop":
        return ometria_error(500, "dropped"), kind  # never sent
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ometria_error(400, "Payload invalid: the body is not valid JSON."), kind
    try:
        records = check_batch(body, settings, [orjson.dumps(r) for r in body] if isinstance(body, list) else None)
    except PushRejected as exc:
        return ometria_error(400, str(exc)), kind
    if not account.enqueue(len(records)):
        remaining = max(0, settings.backlog_limit - account.backlog())
        return ometria_error(
            429,
            f"Backlog full: {settings.backlog_limit} records are waiting to be processed.",
            {
                "X-QueueSize-Limit": str(settings.backlog_limit),
                "X-QueueSize-Remaining": str(remaining),
                "Retry-After": "1",
            },
        ), kind
    request_id = str(uuid.uuid4())
    accepted, rejected = account.push(records, request_id)
    queue_headers["X-QueueSize-Remaining"] = str(max(0, settings.backlog_limit - account.backlog()))
    body_out = {"status": "OK", "request_id": request_id, "accepted": accepted, "rejected": rejected}
    if kind == "slow":
        kind = "store_then_slow"
    return Reply(202, orjson.dumps(body_out), JSON, queue_headers), kind


async def om_errors(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    key = request.headers.get("X-Ometria-Auth")
    account = state.om_by_key.get(key) if key else None
    if account is None:
        return web.json_response({"status": "ERROR", "message": "Unauthorized"}, status=401)
    # The 100 most recent errors; with `request_id` (repeatable) every error of those requests.
    wanted = request.query.getall("request_id", [])
    return web.json_response(account.errors_of(wanted or None))


# ---------------------------------------------------------------------------- admin
def _admin_json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    """The change as a JSON object; each route validates all of it before applying any (atomic)."""
    raw = await request.read()
    body = orjson.loads(raw) if raw else {}
    if not isinstance(body, dict):
        raise ValueError(f"the body must be a JSON object, not {type(body).__name__}")
    return body


def _admin_list(request: web.Request) -> MailchimpList:
    state: SandboxState = request.app[STATE]
    lst = state.lists.get(request.match_info["list_id"])
    if lst is None:
        raise web.HTTPNotFound(text=f"no list {request.match_info['list_id']}")
    return lst


def _admin(handler: Callable[[web.Request], Awaitable[web.Response]]):
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except MailchimpProblem as exc:
            return _admin_json({"error": exc.title, "detail": exc.detail}, exc.status)
        except (ValueError, KeyError, TypeError) as exc:
            return _admin_json({"error": type(exc).__name__, "detail": str(exc)}, 400)

    return wrapped


@_admin
async def admin_health(request: web.Request) -> web.Response:
    return _admin_json({"status": "ok"})


@_admin
async def admin_config(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    return _admin_json(
        {
            "seed": state.config.seed,
            "clients": [
                {
                    "client_id": c,
                    "dc": mc.dc,
                    "lists": [{"id": lst.id, "name": lst.name, "members": len(lst)} for lst in mc.ordered_lists()],
                }
                for c, mc in state.mc_by_client.items()
            ],
        }
    )


@_admin
async def admin_stats(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    return _admin_json(
        {
            "keys": state.stats.snapshot(with_log=request.query.get("log") == "1"),
            "server_cpu_s": time.thread_time(),  # the event loop's thread: the server's own CPU
            "faults_injected": dict(state.faults.injected),
        }
    )


@_admin
async def admin_reset(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    body = await _body(request)
    state.stats.reset()
    state.faults.clear()
    if body.get("ometria", False):
        for om in state.om_by_client.values():
            om.reset()
    return _admin_json({"status": "reset"})


@_admin
async def admin_clock(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    if request.method == "POST":
        body = await _body(request)
        advance = float(body["advance"]) if "advance" in body else None
        if advance is not None and not math.isfinite(advance):
            raise ValueError(f"advance must be a finite number of seconds, not {advance}")
        when = parse_time(str(body["set"]), "set") if "set" in body else None
        if advance is not None:
            state.clock.advance(advance)
        if when is not None:
            state.clock.set(float(when))
        if body.get("reset"):
            state.clock.reset()
    return _admin_json({"now": state.clock.now_dt().isoformat()})


@_admin
async def admin_add_member(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    body = await _body(request)
    member = _admin_list(request).add(
        body["email_address"],
        status=body.get("status", "subscribed"),
        merge_fields=body.get("merge_fields"),
        clock=state.clock,
    )
    return _admin_json(member, 201)


@_admin
async def admin_update_member(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    body = await _body(request)
    member = _admin_list(request).update(request.match_info["key"], clock=state.clock, **body)
    return _admin_json(member)


@_admin
async def admin_member_action(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    lst = _admin_list(request)
    key, action = request.match_info["key"], request.match_info["action"]
    statuses = {
        "unsubscribe": "unsubscribed",
        "clean": "cleaned",
        "archive": "archived",
        "resubscribe": "subscribed",
        "pending": "pending",
    }
    if action == "delete":
        lst.delete_permanently(key)
        return _admin_json({"deleted": key})
    if action not in statuses:
        raise ValueError(f"unknown action {action!r}; known: {[*statuses, 'delete']}")
    return _admin_json(lst.update(key, clock=state.clock, status=statuses[action]))


@_admin
async def admin_faults(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    body = await _body(request)
    target = body["target"]
    if not isinstance(target, str):
        raise ValueError(f"target must be a string, not {target!r}")
    rates = Faults.model_validate(body["rates"]) if body.get("rates") else None
    script = body.get("script", [])
    if not isinstance(script, list):
        raise ValueError(f"script must be a list of fault kinds, not {script!r}")
    if script:
        state.faults.script(target, script)  # refuses an unknown kind before queueing any
    if "rates" in body:
        state.faults.set_rates(target, rates)
    return _admin_json({"target": target, "pending": state.faults.pending(target)})


@_admin
async def admin_revoke(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    client = request.match_info["client_id"]
    service = request.match_info["service"]
    revoked = (await _body(request)).get("revoked", True)
    accounts = state.mc_by_client if service == "mailchimp" else state.om_by_client
    accounts[client].revoked = bool(revoked)
    return _admin_json({"client_id": client, "service": service, "revoked": bool(revoked)})


@_admin
async def admin_contacts(request: web.Request) -> web.Response:
    state: SandboxState = request.app[STATE]
    om = state.om_by_client[request.match_info["client_id"]]
    return _admin_json({"contacts": om.snapshot(request.query.get("collection")), "writes": om.writes})


@_admin
async def admin_ometria_unsubscribe(request: web.Request) -> web.Response:
    """An opt-out made in Ometria (its unsubscribe link; `{"force": true}`: its preference centre)."""
    state: SandboxState = request.app[STATE]
    m = request.match_info
    forced = bool((await _body(request)).get("force", False))
    om = state.om_by_client[m["client_id"]]
    return _admin_json(om.unsubscribe(m["collection"], m["contact_id"], state.clock.now_dt().isoformat(), forced))


def build_app(state: SandboxState) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[STATE] = state
    r = app.router
    r.add_get("/3.0/", mc_root)
    r.add_get("/3.0/ping", mc_ping)
    r.add_get("/3.0/lists", mc_lists)
    r.add_get("/3.0/lists/{list_id}", mc_list)
    r.add_get("/3.0/lists/{list_id}/members", mc_members)
    r.add_get("/3.0/lists/{list_id}/members/{subscriber_hash}", mc_member)
    r.add_route("*", "/3.0/{tail:.*}", mc_not_found)
    r.add_post("/v2/push", om_push)
    r.add_get("/v2/push/_errors", om_errors)
    r.add_get("/_sandbox/health", admin_health)
    r.add_get("/_sandbox/config", admin_config)
    r.add_get("/_sandbox/stats", admin_stats)
    r.add_post("/_sandbox/reset", admin_reset)
    r.add_route("*", "/_sandbox/clock", admin_clock)
    r.add_post("/_sandbox/faults", admin_faults)
    r.add_post("/_sandbox/mailchimp/lists/{list_id}/members", admin_add_member)
    r.add_patch("/_sandbox/mailchimp/lists/{list_id}/members/{key}", admin_update_member)
    r.add_post("/_sandbox/mailchimp/lists/{list_id}/members/{key}/actions/{action}", admin_member_action)
    r.add_post("/_sandbox/{service:mailchimp|ometria}/accounts/{client_id}/revoke", admin_revoke)
    r.add_get("/_sandbox/ometria/accounts/{client_id}/contacts", admin_contacts)
    r.add_post(
        "/_sandbox/ometria/accounts/{client_id}/contacts/{collection}/{contact_id}/unsubscribe",
        admin_ometria_unsubscribe,
    )
    return app
