"""The sandbox's Ometria Data API (mounted under /v2): the push endpoint and its error listing.

Auth, the rate limit, faults, latency and accounting are the sub-application's middlewares
(sandbox/middlewares.py); the store and its validation are sandbox/ometria.py.
"""

from __future__ import annotations

import uuid

import orjson
from aiohttp import web

from mc_pipeline.sandbox.config import OmetriaSettings
from mc_pipeline.sandbox.middlewares import (
    accounting,
    in_flight,
    json_bytes,
    latency,
    ometria_account,
    ometria_authentication,
    ometria_error,
    ometria_faults,
    ometria_rate_limit,
    queue_headers,
    request_bytes,
    state_of,
    unmetered,
)
from mc_pipeline.sandbox.ometria import PushRejected, SandboxOmetriaAccount, check_batch
from mc_pipeline.sandbox.state import ACCOUNT

routes = web.RouteTableDef()


@routes.post("/push")
async def push(request: web.Request) -> web.Response:
    state = state_of(request)
    settings: OmetriaSettings = state.config.ometria
    account: SandboxOmetriaAccount = request[ACCOUNT]
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ometria_error(400, "Payload invalid: the body is not valid JSON.")
    try:
        records = check_batch(body, settings, [orjson.dumps(r) for r in body] if isinstance(body, list) else None)
    except PushRejected as exc:
        return ometria_error(400, str(exc))
    if not account.enqueue(len(records)):
        message = f"Backlog full: {settings.backlog_limit} records are waiting to be processed."
        return ometria_error(429, message, {**queue_headers(state, account), "Retry-After": "1"})
    request_id = str(uuid.uuid4())
    accepted, rejected = account.push(records, request_id)
    answer = {"status": "OK", "request_id": request_id, "accepted": accepted, "rejected": rejected}
    return json_bytes(orjson.dumps(answer), 202, queue_headers(state, account))


@routes.get("/push/_errors")
@unmetered
async def errors(request: web.Request) -> web.Response:
    """The 100 most recent errors; with `request_id` (repeatable) every error of those requests."""
    account = ometria_account(state_of(request), request)
    if account is None:
        return web.json_response({"status": "ERROR", "message": "Unauthorized"}, status=401)
    wanted = request.query.getall("request_id", [])
    return web.json_response(account.errors_of(wanted or None))


def ometria_app() -> web.Application:
    app = web.Application(
        client_max_size=16 * 1024 * 1024,
        middlewares=[
            accounting("ometria", ometria_account),
            in_flight(),
            latency(lambda state: state.config.ometria.latency, request_bytes),
            ometria_authentication,
            ometria_rate_limit,
            ometria_faults,
        ],
    )
    app.add_routes(routes)
    return app
