"""Ometria push API: batches of at most 100 records, a shared per-account rate limiter, safe retries.

A push is an upsert by (@collection, id), so any batch may be sent again: a timeout after
Ometria stored a batch costs a rewrite, never a duplicate. Policy per request:
- 429 (rate or backlog): wait `Retry-After` (the limiter holds every thread back), retry.
- 5xx, timeouts, dropped connections, an unreadable answer: backoff with jitter, bounded.
- 401/403 (key) and 402 (quota): stop the client's import at once: the stop flag is checked
  before every attempt, so no thread of this client sends again. 400: the batch is refused.
`push_batches` (in `ometria_push`) fans batches out and ties what Ometria refused to its records.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NoReturn

import orjson
import requests
from pydantic import Field, SecretStr

from mc_pipeline.registry import Client
from mc_pipeline.resources.errors import (
    OmetriaAuthError,
    OmetriaBatchRejected,
    OmetriaQuotaError,
    OmetriaRequestError,
    OmetriaUnavailable,
    PushStopped,
)
from mc_pipeline.resources.http import TRANSIENT, HttpSettings, pooled_session
from mc_pipeline.resources.limits import SlidingWindowLimiter, account_limiter, fingerprint
from mc_pipeline.resources.ometria_outcome import PushOutcome, PushResult, PushStats
from mc_pipeline.resources.ometria_push import LOOKUP_CHUNK, Fanout
from mc_pipeline.resources.retry import HttpRetryPolicy, Retryable, retry_after

log = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://api.ometria.com/v2"
MAX_RECORDS = 100
DATA_API_RATE = 4.0  # requests per second per account for the data API (GET /push/_errors)


class OmetriaClient:
    def __init__(
        self,
        *,
        client_id: str,
        api_key: SecretStr,
        base_url: str | None,
        requests_per_second: float,
        timeout: tuple[float, float],
        policy: HttpRetryPolicy,
        pool_size: int,
        logger: Any = None,
        allow_private_network: bool = False,
        deadline_s: float | None = None,
    ) -> None:
        self.client_id = client_id
        key = api_key.get_secret_value()
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.timeout = timeout
        self.policy = policy
        self.log = logger or log
        self.limiter: SlidingWindowLimiter = account_limiter(f"ometria:{fingerprint(key)}", requests_per_second)
        self.data_limiter = account_limiter(f"ometria-data:{fingerprint(key)}", DATA_API_RATE)
        self.workers = pool_size
        self.stop = threading.Event()  # set by the first refusal that stops this client's pushes
        self.session = pooled_session(
            pool_size,
            {"X-Ometria-Auth": key, "Content-Type": "application/json"},
            refused=lambda message: OmetriaRequestError(message, client_id=client_id),
            allow_private_network=allow_private_network,
            deadline_s=deadline_s,
        )
        self._rng = random.Random()

    def close(self) -> None:
        self.session.close()

    def push(self, body: bytes, n_records: int, stats: PushStats, *, list_id: str | None = None) -> PushResult:
        """POST one batch (a JSON array of at most 100 records), retried until Ometria answers."""
        if n_records > MAX_RECORDS:
            raise ValueError(f"a batch holds at most {MAX_RECORDS} records, not {n_records}")

        def before_attempt() -> None:
            self._check_stop(list_id)
            self.limiter.acquire()  # every attempt, retries included, counts against the rate
            self._check_stop(list_id)  # a refusal may have come while this thread waited its turn
            stats.add(requests=1)

        return self.policy.call(
            lambda: self._try(body, n_records, list_id, stats),
            stats,
            lambda message: OmetriaUnavailable(message, client_id=self.client_id, list_id=list_id),
            before_attempt=before_attempt,
            on_throttle=self.limiter.penalise,  # Ometria's window is fuller than ours thought: hold every thread
            log=self.log,
            rng=self._rng,
        )

    def push_batches(
        self,
        batches: Iterable[list[dict[str, Any]]],
        stats: PushStats,
        *,
        list_id: str | None = None,
    ) -> PushOutcome:
        """Push every batch (lists of at most 100 records) with `workers` threads at the account's
        rate; returns what Ometria refused, each tied to its batch and place. See `ometria_push`."""
        return self.fanout(stats, list_id=list_id).run(batches)

    def fanout(
        self, stats: PushStats, *, list_id: str | None = None, progress: Callable[[PushStats], None] | None = None
    ) -> Fanout:
        """A push in parts (`with client.fanout(...) as f: f.push(batches, then)`): each part is handed
        on once its answers and errors are in, while the next one pushes. See `ometria_push`."""
        return Fanout(self, stats, list_id=list_id, workers=self.workers, progress=progress)

    def errors_of(
        self, request_ids: list[str], stats: PushStats, *, list_id: str | None = None, even_stopped: bool = False
    ) -> list[dict]:
        """`GET /push/_errors` for these requests, `LOOKUP_CHUNK` at a time; only entries naming one of them.
        `even_stopped`: after the stop flag, only to name the reason of the stop (a systemic rejection)."""
        out: list[dict] = []

        def before_attempt() -> None:
            if not even_stopped:
                self._check_stop(list_id)
            self.data_limiter.acquire()  # the data API's own rate, not the pushes'
            stats.add(lookups=1)

        for start in range(0, len(request_ids), LOOKUP_CHUNK):
            out += self.policy.call(
                partial(self._try_errors, request_ids[start : start + LOOKUP_CHUNK], list_id),
                stats,
                lambda message: OmetriaUnavailable(
                    f"errors lookup: {message}", client_id=self.client_id, list_id=list_id
                ),
                before_attempt=before_attempt,
                on_throttle=self.data_limiter.penalise,
                log=self.log,
                rng=self._rng,
            )
        return out

    def _check_stop(self, list_id: str | None) -> None:
        if self.stop.is_set():
            raise PushStopped(
                "stopped: another request of this account was refused", client_id=self.client_id, list_id=list_id
            )

    def _try_errors(self, request_ids: list[str], list_id: str | None) -> list[dict]:
        try:
            resp = self.session.get(
                f"{self.base_url}/push/_errors", params=[("request_id", r) for r in request_ids], timeout=self.timeout
            )
            content = resp.content
        except TRANSIENT as exc:
            raise Retryable(type(exc).__name__) from None
        if resp.status_code != 200:
            self._raise_for(resp.status_code, content, resp, list_id)
        try:
            doc = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise Retryable("200 with an unreadable errors list") from None
        wanted = set(request_ids)  # an entry of another request is never attached to these
        entries = doc if isinstance(doc, list) else []
        return [e for e in entries if isinstance(e, dict) and e.get("request_id") in wanted]

    def _try(self, body: bytes, n: int, list_id: str | None, stats: PushStats) -> PushResult:
        """One POST: the result, `Retryable` for what may pass later, an OmetriaError for what will not."""
        try:
            resp = self.session.post(f"{self.base_url}/push", data=body, timeout=self.timeout)
            content = resp.content
        except TRANSIENT as exc:
            raise Retryable(f"{type(exc).__name__} (the batch may have been stored; resending is safe)") from None
        status = resp.status_code
        if 200 <= status < 300:
            try:
                doc = orjson.loads(content)
                accepted, rejected = int(doc["accepted"]), int(doc["rejected"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                raise Retryable(f"{status} with an unreadable answer") from None
            if accepted + rejected != n:
                raise Retryable(f"answer counts {accepted}+{rejected} for a batch of {n}")
            stats.add(batches=1, pushed=n, accepted=accepted, rejected=rejected)
            return PushResult(accepted, rejected, doc.get("request_id"))
        self._raise_for(status, content, resp, list_id)

    def _raise_for(self, status: int, content: bytes, resp: requests.Response, list_id: str | None) -> NoReturn:
        """A non-2xx answer: `Retryable` for what may pass later, an OmetriaError for what will not."""
        message = _message(content) or resp.reason
        if status == 429:
            wait_s = retry_after(resp)
            if resp.headers.get("X-QueueSize-Remaining") == "0" or "backlog" in message.lower():
                cause = "429 backlog full"
                wait_s = max(wait_s or 0.0, 2.0)
            else:
                cause = "429 rate limited"
            raise Retryable(cause, wait_s, throttle=True)
        if status >= 500:
            raise Retryable(f"{status} {message}"[:200])
        if status in (401, 403):
            raise OmetriaAuthError(f"{status} {message}", client_id=self.client_id, list_id=list_id, status=status)
        if status == 402 or "quota" in message.lower():
            raise OmetriaQuotaError(f"{status} {message}", client_id=self.client_id, list_id=list_id, status=status)
        raise OmetriaBatchRejected(f"{status} {message}", client_id=self.client_id, list_id=list_id, status=status)


def _message(content: bytes) -> str | None:
    try:
        doc = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict):
        return str(doc.get("message") or doc.get("detail") or doc.get("title") or "")[:300] or None
    return None


class OmetriaResource(HttpSettings):
    """HTTP settings for every Ometria account; credentials come per client from the registry."""

    max_throttle_waits: int = Field(default=120, ge=0, description="per request, for 429s (rate and backlog)")
    workers: int = Field(default=4, ge=1, le=16, description="batches in flight; the rate limiter bounds the rate")
    max_dead_letter_share: float = Field(
        default=0.01, ge=0, le=1, description="above this share of a list in outstanding dead letters, its check fails"
    )

    def client(self, client: Client, logger: Any = None) -> OmetriaClient:
        return OmetriaClient(
            client_id=client.id,
            api_key=client.ometria.api_key.resolve(),
            base_url=client.ometria.base_url,
            requests_per_second=client.ometria.requests_per_second,
            timeout=self.timeouts(),
            policy=self.retry_policy(),
            pool_size=self.workers,
            logger=logger,
            allow_private_network=client.ometria.allow_private_network,
            deadline_s=self.deadline_s,
        )
