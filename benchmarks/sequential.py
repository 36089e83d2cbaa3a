"""A sequential Mailchimp paginator, the way common open-source connectors page an audience.

Airbyte's and Singer's Mailchimp sources read `GET /lists/{id}/members` with `count=1000` and an
increasing `offset`, one request after the other on one connection, usually with every field.
This is that loop, with `requests`, so the pipeline's concurrent fetch has a baseline measured
against the same server in the same run.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import requests


def page_sequentially(
    base_url: str, key: str, list_id: str, *, fields: str | None, max_pages: int | None = None, count: int = 1000
) -> dict[str, Any]:
    """Page the list from offset 0 until `total_items` (or `max_pages`); members per second."""
    session = requests.Session()
    session.auth = ("bench", key)
    url = f"{base_url.rstrip('/')}/lists/{list_id}/members"
    params: dict[str, Any] = {"count": count, "offset": 0}
    if fields:
        params["fields"] = fields
    pages = members = nbytes = 0
    total: int | None = None
    cpu0, started = time.process_time(), time.perf_counter()
    while total is None or params["offset"] < total:
        response = session.get(url, params=params, timeout=120)
        response.raise_for_status()
        body = orjson.loads(response.content)
        total = int(body["total_items"])
        batch = len(body["members"])
        members += batch
        nbytes += len(response.content)
        pages += 1
        params["offset"] += count
        if batch == 0 or (max_pages is not None and pages >= max_pages):
            break
    wall = time.perf_counter() - started
    session.close()
    return {
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu0,
        "members": members,
        "pages": pages,
        "bytes": nbytes,
        "total_items": total,
        "members_per_s": members / wall if wall else 0.0,
    }
