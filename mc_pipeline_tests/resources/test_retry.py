"""One retry policy for both APIs: one `Retry-After` parser (seconds or an HTTP date, capped), one
attempt budget per request (a page of the wrong shape shares it with 5xx answers)."""

from __future__ import annotations

import types
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from time import time
from urllib.parse import unquote

import pytest
from pydantic import SecretStr

from mc_pipeline.resources import retry
from mc_pipeline.resources.errors import MailchimpUnavailable, OmetriaUnavailable
from mc_pipeline.resources.mailchimp import MailchimpClient, Response
from mc_pipeline.resources.ometria import OmetriaClient, PushStats
from mc_pipeline.resources.paging import FetchStats
from mc_pipeline.resources.retry import MAX_RETRY_AFTER_S, HttpRetryPolicy, Retryable
from mc_pipeline_tests.resources.test_http import KEY, OM_KEY, Server

ONE_WAIT = HttpRetryPolicy(max_attempts=2, max_throttle_waits=1, backoff_base_s=0.01, backoff_cap_s=0.02)


class Throttling(Server):
    """Answers every request `429` with the `Retry-After` given in the path: `/after/<quoted value>/...`."""

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        h.rfile.read(int(h.headers.get("Content-Length") or 0))  # the body, so the connection can be kept
        value = unquote(h.path.split("/")[2])
        h.send_response(429)
        h.send_header("Retry-After", value)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "2")
        h.end_headers()
        h.wfile.write(b"{}")


@pytest.fixture
def throttling() -> Iterator[Throttling]:
    s = Throttling()
    yield s
    s.close()


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The policy's sleeps, recorded instead of slept (only the retry module's `time` is replaced)."""
    slept: list[float] = []
    monkeypatch.setattr(retry, "time", types.SimpleNamespace(sleep=slept.append))
    return slept


def _mailchimp(url: str | None, policy: HttpRetryPolicy = ONE_WAIT) -> MailchimpClient:
    return MailchimpClient(
        client_id="acme",
        api_key=SecretStr(KEY),
        base_url=url,
        max_connections=1,
        page_size=10,
        timeout=(2, 2),
        policy=policy,
    )


def _ometria(url: str) -> OmetriaClient:
    om = OmetriaClient(
        client_id="acme",
        api_key=SecretStr(OM_KEY),
        base_url=url,
        requests_per_second=50,
        timeout=(2, 2),
        policy=ONE_WAIT,
        pool_size=1,
    )
    om.limiter.penalise = lambda seconds: None  # type: ignore[method-assign]  # the wait is what is measured
    return om


def _waits_of(throttling: Throttling, header: str, waits: list[float]) -> tuple[float, float]:
    """The wait each client takes for one 429 with this `Retry-After`."""
    base = f"{throttling.url}/after/{header.replace(' ', '%20')}"
    with pytest.raises(MailchimpUnavailable, match="still throttled after 1 waits"):
        _mailchimp(base).get("/lists", {}, list_id=None, stats=FetchStats())
    with pytest.raises(OmetriaUnavailable, match="still throttled after 1 waits"):
        _ometria(base).push(b"[]", 0, PushStats())
    mailchimp, ometria = waits
    waits.clear()
    return mailchimp, ometria


def test_both_apis_read_retry_after_one_way(throttling: Throttling, waits: list[float]) -> None:
    """Seconds are taken as given; more than the cap waits the cap; an HTTP date is honoured."""
    assert _waits_of(throttling, "7", waits) == (7.0, 7.0)
    assert _waits_of(throttling, "600", waits) == (MAX_RETRY_AFTER_S, MAX_RETRY_AFTER_S)
    mailchimp, ometria = _waits_of(throttling, formatdate(time() + 30, usegmt=True), waits)
    assert 25 <= mailchimp <= 30 and 25 <= ometria <= 30


def test_an_unreadable_retry_after_falls_back_to_the_backoff(throttling: Throttling, waits: list[float]) -> None:
    mailchimp, ometria = _waits_of(throttling, "soon", waits)
    assert mailchimp <= ONE_WAIT.backoff_cap_s and ometria <= ONE_WAIT.backoff_cap_s


def test_a_page_of_the_wrong_shape_shares_the_requests_attempt_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """500, then a 200 without `members`, alternately: 3 attempts in all, not 3 per kind of fault."""
    answers = [0]

    def get_once(self, path, params, *, list_id, stats):
        answers[0] += 1
        stats.add(calls=1)
        if answers[0] % 2:
            raise Retryable("500 Internal Server Error")
        return Response(b'{"total_items": 5}', {"total_items": 5}, None)

    monkeypatch.setattr(MailchimpClient, "_get_once", get_once)
    policy = HttpRetryPolicy(max_attempts=3, max_throttle_waits=0, backoff_base_s=0.001, backoff_cap_s=0.002)
    mc = _mailchimp(None, policy)  # the default datacenter URL: no request leaves (_get_once answers)
    stats = FetchStats()
    with pytest.raises(MailchimpUnavailable, match="gave up after 3 attempts; last cause: 500"):
        mc._page("0123456789", 0, {}, stats)
    assert answers[0] == 3 and stats.calls == 3
    assert stats.retries == 2  # every retry counted, the wrong shape too
    assert stats.causes == {
        "500 Internal Server Error": 2,
        "the page at offset 0 has no 'members' list or 'total_items'": 1,
    }
