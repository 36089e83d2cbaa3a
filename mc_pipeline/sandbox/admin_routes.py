"""The sandbox's own API (mounted under /_sandbox): health, config, stats, clock, faults and the
changes a test or a person makes to members and accounts while a pipeline runs against it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from mc_pipeline.sandbox.config import Faults
from mc_pipeline.sandbox.mailchimp import MailchimpList, MailchimpProblem
from mc_pipeline.sandbox.member_query import parse_time
from mc_pipeline.sandbox.middlewares import state_of

routes = web.RouteTableDef()


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
    state = state_of(request)
    lst = state.lists.get(request.match_info["list_id"])
    if lst is None:
        raise web.HTTPNotFound(text=f"no list {request.match_info['list_id']}")
    return lst


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return _admin_json({"status": "ok"})


@routes.get("/config")
async def config(request: web.Request) -> web.Response:
    state = state_of(request)
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


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    state = state_of(request)
    return _admin_json(
        {
            "keys": state.stats.snapshot(with_log=request.query.get("log") == "1"),
            "server_cpu_s": time.thread_time(),  # the event loop's thread: the server's own CPU
            "faults_injected": dict(state.faults.injected),
        }
    )


@routes.post("/reset")
async def reset(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    state.stats.reset()
    state.faults.clear()
    if body.get("ometria", False):
        for om in state.om_by_client.values():
            om.reset()
    return _admin_json({"status": "reset"})


@routes.route("*", "/clock")
async def clock(request: web.Request) -> web.Response:
    state = state_of(request)
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


@routes.post("/mailchimp/lists/{list_id}/members")
async def add_member(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    member = _admin_list(request).add(
        body["email_address"],
        status=body.get("status", "subscribed"),
        merge_fields=body.get("merge_fields"),
        clock=state.clock,
    )
    return _admin_json(member, 201)


@routes.patch("/mailchimp/lists/{list_id}/members/{key}")
async def update_member(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _body(request)
    member = _admin_list(request).update(request.match_info["key"], clock=state.clock, **body)
    return _admin_json(member)


@routes.post("/mailchimp/lists/{list_id}/members/{key}/actions/{action}")
async def member_action(request: web.Request) -> web.Response:
    state = state_of(request)
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


@routes.post("/faults")
async def faults(request: web.Request) -> web.Response:
    state = state_of(request)
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


@routes.post("/{service:mailchimp|ometria}/accounts/{client_id}/revoke")
async def revoke(request: web.Request) -> web.Response:
    state = state_of(request)
    client = request.match_info["client_id"]
    service = request.match_info["service"]
    revoked = (await _body(request)).get("revoked", True)
    accounts = state.mc_by_client if service == "mailchimp" else state.om_by_client
    accounts[client].revoked = bool(revoked)
    return _admin_json({"client_id": client, "service": service, "revoked": bool(revoked)})


@routes.get("/ometria/accounts/{client_id}/contacts")
async def contacts(request: web.Request) -> web.Response:
    state = state_of(request)
    om = state.om_by_client[request.match_info["client_id"]]
    return _admin_json({"contacts": om.snapshot(request.query.get("collection")), "writes": om.writes})


@routes.post("/ometria/accounts/{client_id}/contacts/{collection}/{contact_id}/unsubscribe")
async def ometria_unsubscribe(request: web.Request) -> web.Response:
    """An opt-out made in Ometria (its unsubscribe link; `{"force": true}`: its preference centre)."""
    state = state_of(request)
    m = request.match_info
    forced = bool((await _body(request)).get("force", False))
    om = state.om_by_client[m["client_id"]]
    return _admin_json(om.unsubscribe(m["collection"], m["contact_id"], state.clock.now_dt().isoformat(), forced))


@web.middleware
async def admin_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A refused change as a JSON error; nothing of it was applied."""
    try:
        return await handler(request)
    except MailchimpProblem as exc:
        return _admin_json({"error": exc.title, "detail": exc.detail}, exc.status)
    except (ValueError, KeyError, TypeError) as exc:
        return _admin_json({"error": type(exc).__name__, "detail": str(exc)}, 400)


def admin_app() -> web.Application:
    app = web.Application(middlewares=[admin_errors])
    app.add_routes(routes)
    return app
