"""Small HTTP helpers for the sandbox's wire tests: real requests, nothing mocked."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests

from mc_pipeline.sandbox import Sandbox

TIMEOUT = 10.0
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance"}


def mc_get(
    sb: Sandbox,
    path: str,
    client_id: str = "client-1",
    *,
    params: dict[str, Any] | None = None,
    timeout: float = TIMEOUT,
    **kwargs: Any,
) -> requests.Response:
    """GET `path` (relative to /3.0) with the client's key as HTTP Basic password."""
    if "auth" not in kwargs and "headers" not in kwargs:
        kwargs["auth"] = ("anystring", sb.client(client_id).mailchimp_key)
    return requests.get(f"{sb.mailchimp_url}{path}", params=params, timeout=timeout, **kwargs)


def members(sb: Sandbox, list_id: str, client_id: str = "client-1", **params: Any) -> dict[str, Any]:
    """One page of GET /lists/{id}/members, asserting a 200."""
    r = mc_get(sb, f"/lists/{list_id}/members", client_id, params=params)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def all_members(sb: Sandbox, list_id: str, client_id: str = "client-1", **params: Any) -> list[dict[str, Any]]:
    """Every member matching `params`, paged with count=1000 as a sync would."""
    fields = params.get("fields")
    if fields and "total_items" not in fields.split(","):
        params["fields"] = f"{fields},total_items"  # paging needs the total
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = members(sb, list_id, client_id, count=1000, offset=offset, **params)
        out.extend(page["members"])
        offset += 1000
        if offset >= page["total_items"]:
            return out


def assert_problem(r: requests.Response, status: int, title: str | None = None) -> dict[str, Any]:
    """An application/problem+json error with Mailchimp's five keys."""
    assert r.status_code == status, r.text[:500]
    assert r.headers["Content-Type"].startswith("application/problem+json"), r.headers["Content-Type"]
    body = r.json()
    assert set(body) == PROBLEM_KEYS, body
    assert body["status"] == status
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["instance"], str) and body["instance"]
    if title is not None:
        assert body["title"] == title
    return body


def om_push(
    sb: Sandbox,
    records: Any = None,
    client_id: str = "client-1",
    *,
    data: bytes | None = None,
    key: str | None = None,
    timeout: float = TIMEOUT,
) -> requests.Response:
    """POST /v2/push with the client's Ometria key (or `key`), a JSON body or raw `data`."""
    headers = {"Content-Type": "application/json"}
    auth = sb.client(client_id).ometria_key if key is None else key
    if auth:
        headers["X-Ometria-Auth"] = auth
    kwargs: dict[str, Any] = {"data": data} if data is not None else {"json": records}
    return requests.post(f"{sb.ometria_url}/push", headers=headers, timeout=timeout, **kwargs)


def contact(rid: str, email: str | None = None, collection: str = "mailchimp-test", **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "@type": "contact",
        "@collection": collection,
        "id": rid,
        "email": email if email is not None else f"{rid}@example.org",
        "marketing_optin": "EXPLICITLY_OPTEDIN",
        "timestamp_subscribed": "2025-03-01T10:00:00+00:00",
    }
    record.update(fields)
    return record


def admin(sb: Sandbox, method: str, path: str, **kwargs: Any) -> requests.Response:
    """A call to the sandbox's own API under /_sandbox."""
    return requests.request(method, f"{sb.base_url}/_sandbox{path}", timeout=TIMEOUT, **kwargs)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until `predicate()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)
