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
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import requests
from dagster import ConfigurableResource
from pydantic import Field, SecretStr
from requests.adapters import HTTPAdapter

from mc_pipeline.registry import Client
from mc_pipeline.resources.errors import (
    OmetriaAuthError,
    OmetriaBatchRejected,
    OmetriaQuotaError,
    OmetriaUnavailable,
)
from mc_pipeline.resources.limits import SlidingWindowLimiter, account_limiter, backoff_delay, fingerprint

log = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://api.ometria.com/v2"
MAX_RECORDS = 100
_TRANSIENT = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


@dataclass
class PushStats:
    requests: int = 0
    batches: int = 0
    pushed: int = 0  # records in batches Ometria acknowledged
    accepted: int = 0
    rejected: int = 0
    throttled: int = 0  # 429s received
    retries: int = 0
    resent: int = 0  # records sent again to find which of a batch Ometria rejected
    seconds: float = 0.0
    causes: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def note(self, cause: str) -> None:
        with self._lock:
            self.causes[cause] = self.causes.get(cause, 0) + 1


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
        connect_timeout_s: float,
        read_timeout_s: float,
        max_attempts: int,
        max_throttle_waits: int,
        backoff_base_s: float,
        backoff_cap_s: float,
        pool_size: int,
        logger: Any = None,
    ) -> None:
        self.client_id = client_id
        key = api_key.get_secret_value()
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.max_attempts = max_attempts
        self.max_throttle_waits = max_throttle_waits
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.log = logger or log
        self.limiter: SlidingWindowLimiter = account_limiter(f"ometria:{fingerprint(key)}", requests_per_second)
        self.session = requests.Session()
        self.session.headers.update(
            {"X-Ometria-Auth": key, "Content-Type": "application/json", "User-Agent": "mc-pipeline/0.1 (+requests)"}
        )
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0, pool_block=True)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._rng = random.Random()

    def close(self) -> None:
        self.session.close()

    def push(self, body: bytes, n_records: int, stats: PushStats, *, list_id: str | None = None) -> PushResult:
        """POST one batch (a JSON array of at most 100 records), retried until Ometria answers."""
        if n_records > MAX_RECORDS:
            raise ValueError(f"a batch holds at most {MAX_RECORDS} records, not {n_records}")
        attempts = throttles = 0
        while True:
            self.limiter.acquire()
            stats.add(requests=1)
            outcome = self._try(body, n_records, list_id, stats)
            if isinstance(outcome, PushResult):
                return outcome
            cause, wait_s, throttle = outcome
            stats.note(cause)
            if throttle:
                throttles += 1
                stats.add(throttled=1)
                if throttles > self.max_throttle_waits:
                    raise OmetriaUnavailable(
                        f"still throttled after {throttles - 1} waits ({cause})",
                        client_id=self.client_id,
                        list_id=list_id,
                    )
                if wait_s is None:
                    wait_s = backoff_delay(min(throttles, 5), self.backoff_base_s, self.backoff_cap_s, self._rng)
                delay = wait_s
                self.limiter.penalise(delay)
            else:
                attempts += 1
                if attempts >= self.max_attempts:
                    raise OmetriaUnavailable(
                        f"gave up after {attempts} attempts; last cause: {cause}",
                        client_id=self.client_id,
                        list_id=list_id,
                    )
                delay = backoff_delay(attempts - 1, self.backoff_base_s, self.backoff_cap_s, self._rng)
            stats.add(retries=1)
            self.log.debug(f"Ometria {self.client_id}: {cause}; retrying in {delay:.2f}s")
            time.sleep(delay)

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

    def _try(
        self, body: bytes, n: int, list_id: str | None, stats: PushStats
    ) -> PushResult | tuple[str, float | None, bool]:
        """The result, or why to retry: (cause, seconds to wait if the server said, is a throttle)."""
        try:
            resp = self.session.post(f"{self.base_url}/push", data=body, timeout=self.timeout)
            content = resp.content
        except _TRANSIENT as exc:
            return f"{type(exc).__name__} (the batch may have been stored; resending is safe)", None, False
        status = resp.status_code
        if 200 <= status < 300:
            try:
                doc = orjson.loads(content)
                accepted, rejected = int(doc["accepted"]), int(doc["rejected"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                return f"{status} with an unreadable answer", None, False
            if accepted + rejected != n:
                return f"answer counts {accepted}+{rejected} for a batch of {n}", None, False
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
            return cause, wait_s, True
        if status >= 500:
            return f"{status} {message}"[:200], None, False
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


class OmetriaResource(ConfigurableResource):
    """HTTP settings for every Ometria account; credentials come per client from the registry."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_attempts: int = Field(6, ge=1)
    max_throttle_waits: int = Field(120, ge=0)
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
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
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            max_attempts=self.max_attempts,
            max_throttle_waits=self.max_throttle_waits,
            backoff_base_s=self.backoff_base_s,
            backoff_cap_s=self.backoff_cap_s,
            pool_size=self.workers,
            logger=logger,
        )
