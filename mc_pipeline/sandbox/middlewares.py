"""The sandbox's wire behaviour as aiohttp middlewares, so every endpoint of a service behaves alike.

Mailchimp (outermost first): request id -> accounting -> authentication -> in flight (at most 10
per key) -> latency -> faults -> problems. Ometria's push: accounting -> in flight -> latency ->
authentication -> rate limit -> faults. aiohttp's own 404/405 answers and routes marked
`unmetered` pass through untouched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from mc_pipeline.sandbox.config import Faults, Latency
from mc_pipeline.sandbox.mailchimp import MailchimpProblem, SandboxMailchimpAccount
from mc_pipeline.sandbox.ometria import SandboxOmetriaAccount
from mc_pipeline.sandbox.state import ACCOUNT, FAULT, STARTED, STATE, SandboxState
from mc_pipeline.sandbox.stats import RequestRecord

UNKNOWN = "<unknown>"
DROPS = ("drop", "store_then_drop")
FAULT_TIMING = web.RequestKey("fault_timing", Faults)  # the rates whose delays time this request's fault
LABEL = web.RequestKey("label", str)  # the stats' label of the caller: service:client_id
REQUEST_ID = web.RequestKey("request_id", str)  # Mailchimp's X-Request-Id of this answer
RECEIVED = web.RequestKey("received", int)  # bytes of the request's body
_UNMETERED: set[Callable[..., Any]] = set()


def unmetered(handler: Handler) -> Handler:
    """Marks a route the service's middlewares leave alone (not counted, no latency, no faults)."""
    _UNMETERED.add(handler)
    return handler


def metered(fn: Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]) -> Middleware:
    """A middleware for the service's own endpoints only."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        info = request.match_info
        if info.http_exception is not None or info.handler in _UNMETERED:
            return await handler(request)
        return await fn(request, handler)

    middleware.__name__ = fn.__name__
    return middleware


def state_of(request: web.Request) -> SandboxState:
    return request.config_dict[STATE]


# ---------------------------------------------------------------------------- accounting
def accounting(service: str, identify: Callable[[SandboxState, web.Request], Any]) -> Middleware:
    """Per-key stats of every answer, recorded before the client can see it; drops and truncation
    act here, on the wire. `identify` finds the caller's account from its credentials (or None)."""

    @metered
    async def account_for(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = state_of(request)
        request[STARTED] = started = time.monotonic()
        account = identify(state, request)
        request[ACCOUNT] = account
        request[LABEL] = label = f"{service}:{account.client_id if account is not None else UNKNOWN}"
        request[RECEIVED] = received = len(await request.read()) if request.can_read_body else 0

        def record(status: int, sent: int) -> None:
            rec = RequestRecord(
                request.method,
                request.match_info.route.resource.canonical if request.match_info.route.resource else request.path,
                request.path,
                dict(request.query),
                status,
                sent,
                started,
                time.monotonic(),
                request.get(FAULT),
            )
            state.stats.record(label, rec, received)

        try:
            resp = await handler(request)
        except asyncio.CancelledError:  # the client gave up (e.g. its timeout) before the answer
            record(0, 0)
            raise
        return _on_the_wire(request, state, resp, record)

    return account_for


def _on_the_wire(
    request: web.Request, state: SandboxState, resp: web.StreamResponse, record: Callable[[int, int], None]
) -> web.StreamResponse:
    fault = request.get(FAULT)
    if fault in DROPS:
        record(0, 0)
        if request.transport is not None:
            request.transport.abort()
        return web.Response()  # never sent: the transport is gone
    assert isinstance(resp, web.Response) and isinstance(resp.body, bytes)
    body = resp.body
    if fault == "truncate" and resp.status == 200 and len(body) > 2:
        body = body[: max(1, len(body) // 2)]
        resp = web.Response(body=body, status=resp.status, headers=resp.headers)
    record(resp.status, len(body))
    # The sandbox's clock, not the wall's: clients may take "now" from here, as from a real server.
    resp.headers["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(state.clock.now()))
    return resp


# ---------------------------------------------------------------------------- in flight
def in_flight(
    limit_of: Callable[[SandboxState], int] | None = None,
    refuse: Callable[[web.Request, int], web.StreamResponse] | None = None,
) -> Middleware:
    """Requests under way per key (the stats' `in_flight`, `peak_in_flight`); with `limit_of`,
    those beyond the limit are refused by `refuse` and hold no slot (Mailchimp's 10 per key)."""

    @metered
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        state, label = state_of(request), request[LABEL]
        if limit_of is None:
            state.stats.enter(label)
        elif not state.stats.try_enter(label, limit := limit_of(state)):
            assert refuse is not None
            return refuse(request, limit)
        try:
            return await handler(request)
        finally:
            state.stats.leave(label)

    return count


# ---------------------------------------------------------------------------- latency
def sleep_time(latency: Latency, nbytes: int, state: SandboxState, spent: float = 0.0) -> float:
    """What is left of the modelled latency once the sandbox's own `spent` seconds of work are
    counted: the model is the whole answer time, as a client sees it, not the model plus our CPU."""
    modelled = latency.seconds(nbytes, state.faults._rng.random() if latency.jitter_ms else 0.0)
    return max(0.0, modelled - spent)


def latency(
    settings_of: Callable[[SandboxState], Latency], nbytes_of: Callable[[web.Request, web.StreamResponse], int]
) -> Middleware:
    """The latency model over the whole answer, plus a `slow` fault's delay."""

    @metered
    async def delay(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = state_of(request)
        resp = await handler(request)
        spent = time.monotonic() - request[STARTED]
        if request.get(FAULT) in ("slow", "store_then_slow"):
            await asyncio.sleep(request[FAULT_TIMING].slow_delay_s)
        await asyncio.sleep(sleep_time(settings_of(state), nbytes_of(request, resp), state, spent))
        return resp

    return delay


def response_bytes(request: web.Request, resp: web.StreamResponse) -> int:
    body = resp.body if isinstance(resp, web.Response) else None
    return len(body) if isinstance(body, bytes) else 0


def request_bytes(request: web.Request, resp: web.StreamResponse) -> int:
    return request[RECEIVED]


# ---------------------------------------------------------------------------- Mailchimp
ERROR_DOC = "https://mailchimp.com/developer/marketing/docs/errors/"
_AKAMAI_403 = (
    b"<HTML><HEAD><TITLE>Access Denied</TITLE></HEAD><BODY><H1>Access Denied</H1>"
    b"You don't have permission to access this server.<P>Reference #18.sandbox</BODY></HTML>"
)
GATEWAY_504 = b"<html><body><h1>504 Gateway Time-out</h1>The server didn't respond in time.</body></html>"


def json_bytes(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, headers=headers, content_type="application/json", charset="utf-8")


def problem(
    request: web.Request, status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Mailchimp's error document (RFC 7807): `instance` is the answer's X-Request-Id, and a Link
    header names the schema that describes it, as on the real API."""
    instance = request.get(REQUEST_ID) or str(uuid.uuid4())
    body = {"type": ERROR_DOC, "title": title, "status": status, "detail": detail, "instance": instance}
    account = request.get(ACCOUNT)
    schema = f"https://{account.dc if account is not None else 'us1'}.api.mailchimp.com/schema/3.0"
    link = {"Link": f'<{schema}/ProblemDetailDocument.json>; rel="describedBy"'}
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        headers={**link, **(headers or {})},
        content_type="application/problem+json",
        charset="utf-8",
    )


@web.middleware
async def mailchimp_request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer carries X-Request-Id (a problem's `instance` is the same id)."""
    request[REQUEST_ID] = request_id = str(uuid.uuid4())
    resp = await handler(request)
    resp.headers["X-Request-Id"] = request_id
    return resp


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


def mailchimp_account(state: SandboxState, request: web.Request) -> SandboxMailchimpAccount | None:
    key = mailchimp_key(request)
    return state.mc_by_key.get(key) if key else None


@metered
async def mailchimp_authentication(request: web.Request, handler: Handler) -> web.StreamResponse:
    account = request[ACCOUNT]
    if account is None:
        if mailchimp_key(request) is None:
            return problem(request, 401, "API Key Missing", "Your request did not include an API key.")
        detail = "Your API key may be invalid, or you've attempted to access the wrong datacenter."
        return problem(request, 401, "API Key Invalid", detail)
    if account.revoked:
        return problem(request, 403, "User Disabled", "This account has been disabled.")
    return await handler(request)


def too_many_connections(request: web.Request, limit: int) -> web.StreamResponse:
    return problem(
        request, 429, "Too Many Requests", f"You have exceeded the limit of {limit} simultaneous connections."
    )


@metered
async def mailchimp_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Faults scripted or drawn for the request's list, else for the server."""
    list_id = request.match_info.get("list_id")
    kind, rates = state_of(request).faults.draw((list_id, "mailchimp") if list_id else ("mailchimp",))
    if kind is None:
        return await handler(request)
    request[FAULT] = kind
    request[FAULT_TIMING] = rates
    if kind == "500":
        return problem(request, 500, "Internal Server Error", "An unexpected internal error has occurred.")
    if kind == "503":
        return problem(request, 503, "Service Unavailable", "The service is temporarily unavailable. Try again later.")
    if kind == "504":
        await asyncio.sleep(rates.gateway_delay_s)
        return web.Response(body=GATEWAY_504, status=504, content_type="text/html")
    if kind == "429":
        return problem(request, 429, "Too Many Requests", "You have exceeded the limit of 10 simultaneous connections.")
    if kind == "403_throttle":
        return web.Response(body=_AKAMAI_403, status=403, content_type="text/html")
    return await handler(request)  # drop / truncate / slow act on the way out


@web.middleware
async def mailchimp_problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors as problem documents: the handlers' own, and aiohttp's for unknown paths."""
    try:
        return await handler(request)
    except MailchimpProblem as exc:
        return problem(request, exc.status, exc.title, exc.detail)
    except web.HTTPNotFound:
        return problem(request, 404, "Resource Not Found", "The requested resource could not be found.")
    except web.HTTPMethodNotAllowed as exc:
        detail = (
            "The requested method and resource are not compatible. See the Allow header for this resource's methods."
        )
        return problem(request, 405, "Method Not Allowed", detail, {"Allow": ",".join(sorted(exc.allowed_methods))})


# ---------------------------------------------------------------------------- Ometria
def ometria_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_bytes(orjson.dumps({"status": "ERROR", "message": message}), status, headers)


def ometria_account(state: SandboxState, request: web.Request) -> SandboxOmetriaAccount | None:
    key = request.headers.get("X-Ometria-Auth")
    return state.om_by_key.get(key) if key else None


def queue_headers(state: SandboxState, account: SandboxOmetriaAccount) -> dict[str, str]:
    limit = state.config.ometria.backlog_limit
    return {"X-QueueSize-Limit": str(limit), "X-QueueSize-Remaining": str(max(0, limit - account.backlog()))}


@metered
async def ometria_authentication(request: web.Request, handler: Handler) -> web.StreamResponse:
    account = request[ACCOUNT]
    if account is None:
        return ometria_error(401, "Unauthorized: missing or unknown X-Ometria-Auth key.")
    if account.revoked:
        return ometria_error(403, "Forbidden: this API key has been revoked.")
    return await handler(request)


@metered
async def ometria_rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests per sliding second per key; a refused request draws no fault."""
    state = state_of(request)
    wait = request[ACCOUNT].admit()
    if wait is None:
        return await handler(request)
    rate = state.config.ometria.rate_per_second
    headers = {**queue_headers(state, request[ACCOUNT]), "Retry-After": str(max(1, int(wait + 0.999)))}
    return ometria_error(429, f"Too many requests: the limit is {rate} requests per second.", headers)


@metered
async def ometria_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Faults scripted or drawn for the client's account, else for the server; `store_then_*` after storing."""
    state = state_of(request)
    account: SandboxOmetriaAccount = request[ACCOUNT]
    kind, _ = state.faults.draw((account.client_id, "ometria"))
    if kind is None:
        return await handler(request)
    request[FAULT] = kind
    request[FAULT_TIMING] = timing = state.faults.rates(account.client_id) or state.config.ometria.faults
    if kind in ("500", "503"):
        return ometria_error(int(kind), "Internal error, please retry.")
    if kind == "504":
        await asyncio.sleep(timing.gateway_delay_s)
        return web.Response(body=GATEWAY_504, status=504, content_type="text/html")
    if kind == "429":
        return ometria_error(429, "Too many requests.", {**queue_headers(state, account), "Retry-After": "1"})
    if kind == "402":
        return ometria_error(402, "Quota exceeded: this account's monthly contact allowance is used up.")
    if kind == "drop":
        return ometria_error(500, "dropped")  # never sent
    resp = await handler(request)
    if kind == "slow" and resp.status == 202:
        request[FAULT] = "store_then_slow"
    return resp
