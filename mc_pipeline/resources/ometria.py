"""Ometria push API: batches of at most 100 records, a shared per-account rate limiter, safe retries.

A push is an upsert by (@collection, id), so any batch may be sent again: a timeout after
Ometria stored a batch costs a rewrite, never a duplicate. Policy per request:
- 429 (rate or backlog): wait `Retry-After` (the limiter holds every thread back), retry.
- 5xx, timeouts, dropped connections, an unreadable answer: backoff with jitter, bounded.
- 401/403 (key) and 402 (quota): stop the client's import at once. 400: the batch is refused.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

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
)
from mc_pipeline.resources.http import CallStats, HttpSettings, Retry, RetryPolicy, pooled_session
from mc_pipeline.resources.limits import SlidingWindowLimiter, account_limiter, fingerprint

log = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://api.ometria.com/v2"
MAX_RECORDS = 100
_TRANSIENT = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


@dataclass
class PushStats(CallStats):
    requests: int = 0
    batches: int = 0
    pushed: int = 0  # records in batches Ometria acknowledged
    accepted: int = 0
    rejected: int = 0
    resent: int = 0  # records sent again to find which of a batch Ometria rejected
    seconds: float = 0.0


@dataclass(frozen=True)
class PushResult:
    accepted: int
    rejected: int
    request_id: str | None


class OmetriaClient:
    def __init__(
        self,
        *,
        client_id: str,
        api_key: SecretStr,
        base_url: str | None,
        requests_per_second: float,
        timeout: tuple[float, float],
        policy: RetryPolicy,
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
            self.limiter.acquire()  # every attempt, retries included, counts against the rate
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

    def push_records(
        self, records: list[dict[str, Any]], stats: PushStats, *, list_id: str | None = None
    ) -> list[tuple[dict[str, Any], str]]:
        """Push a batch; if Ometria rejects some records, find which by halving the batch and
        sending the halves again (safe: a push is an upsert), down to single records.
        Returns the rejected records with Ometria's reason."""
        result = self.push(orjson.dumps(records), len(records), stats, list_id=list_id)
        if result.rejected == 0:
            return []
        if len(records) == 1:
            return [(records[0], self.last_error() or "rejected by Ometria (no reason given)")]
        half = len(records) // 2
        stats.add(resent=len(records))
        return self.push_records(records[:half], stats, list_id=list_id) + self.push_records(
            records[half:], stats, list_id=list_id
        )

    def last_error(self) -> str | None:
        """The newest entry of GET /push/_errors: why the last rejected record was refused."""
        try:
            resp = self.session.get(f"{self.base_url}/push/_errors", timeout=self.timeout)
            errors = orjson.loads(resp.content) if resp.status_code == 200 else []
        except (requests.RequestException, orjson.JSONDecodeError):
            return None
        if isinstance(errors, list) and errors and isinstance(errors[-1], dict):
            last = errors[-1]
            return f"{last.get('error_message', '')} at {last.get('error_path', '')}".strip()
        return None

    def _try(self, body: bytes, n: int, list_id: str | None, stats: PushStats) -> PushResult:
        """One POST: the result, `Retry` for what may pass later, an OmetriaError for what will not."""
        try:
            resp = self.session.post(f"{self.base_url}/push", data=body, timeout=self.timeout)
            content = resp.content
        except _TRANSIENT as exc:
            raise Retry(f"{type(exc).__name__} (the batch may have been stored; resending is safe)") from None
        status = resp.status_code
        if 200 <= status < 300:
            try:
                doc = orjson.loads(content)
                accepted, rejected = int(doc["accepted"]), int(doc["rejected"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                raise Retry(f"{status} with an unreadable answer") from None
            if accepted + rejected != n:
                raise Retry(f"answer counts {accepted}+{rejected} for a batch of {n}")
            stats.add(batches=1, pushed=n, accepted=accepted, rejected=rejected)
            return PushResult(accepted, rejected, doc.get("request_id"))
        message = _message(content) or resp.reason
        if status == 429:
            retry_after = resp.headers.get("Retry-After")
            wait_s = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
            if resp.headers.get("X-QueueSize-Remaining") == "0" or "backlog" in message.lower():
                cause = "429 backlog full"
                wait_s = max(wait_s or 0.0, 2.0)
            else:
                cause = "429 rate limited"
            raise Retry(cause, wait_s, throttle=True)
        if status >= 500:
            raise Retry(f"{status} {message}"[:200])
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

    max_throttle_waits: int = Field(120, ge=0, description="per request, for 429s (rate and backlog)")
    workers: int = Field(4, ge=1, le=16, description="batches in flight; the rate limiter bounds the rate")
    max_dead_letter_share: float = Field(
        0.01, ge=0, le=1, description="above this share of a run's members in dead letters, the run fails"
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
