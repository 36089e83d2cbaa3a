"""What both API clients share: a guarded pooled session and the settings (timeouts, retries).

The retry loop and the `Retry-After` parser are in retry.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import orjson
import requests
from dagster import ConfigurableResource
from pydantic import Field
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from mc_pipeline.network import address_refusal
from mc_pipeline.resources.retry import HttpRetryPolicy


class RequestRefused(requests.RequestException):
    """A request not sent or not followed: its URL, headers or peer break the rules. Never retried."""


class _AddressRefused(Exception):
    """Not an OSError, so urllib3 neither wraps nor retries it."""


class DeadlineExceeded(requests.Timeout):
    """No complete answer within the request's deadline (a slow drip of headers or body)."""


_current = threading.local()  # the request this thread is sending: its deadline and network policy


@dataclass
class _Watch:
    """One request's deadline, seen by the connection that carries it: at the deadline its
    socket is shut down, which ends any read at once (connect/read timeouts bound each wait,
    not their sum). A connection is detached before it goes back to the pool."""

    allow_private_network: bool
    expired: bool = False
    conn: Any = None
    sock: socket.socket | None = None  # the response reads it even after http.client drops conn.sock
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, conn: Any) -> None:
        with self.lock:
            self.conn, self.sock = conn, conn.sock
            if self.expired:
                self._shut()

    def detach(self, conn: Any) -> None:
        with self.lock:
            if self.conn is conn:
                self.conn = self.sock = None

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            self._shut()

    def _shut(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


class _Guarded:
    """Connection mixin: the peer's address is checked on connect (a DNS name may point at a
    metadata or private address), and each request is tied to its thread's deadline."""

    watch: _Watch | None = None
    plain_http = True

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        watch: _Watch | None = getattr(_current, "watch", None)
        peer = sock.getpeername()[0]
        reason = address_refusal(peer, watch.allow_private_network if watch else False, self.plain_http)
        if reason:
            sock.close()
            raise _AddressRefused(f"{getattr(self, 'host', '?')} resolved to {reason}")
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)  # type: ignore[misc]
        watch = getattr(_current, "watch", None)  # sent: connecting and sending are bounded by the timeouts
        if watch is not None:
            self.watch = watch
            watch.attach(self)


class _Conn(_Guarded, HTTPConnection):
    pass


class _HttpsConn(_Guarded, HTTPSConnection):
    plain_http = False


class _PoolMixin:
    def _put_conn(self, conn: Any) -> None:
        watch = getattr(conn, "watch", None)
        if watch is not None:
            watch.detach(conn)
            conn.watch = None
        super()._put_conn(conn)  # type: ignore[misc]


class _Pool(_PoolMixin, HTTPConnectionPool):
    ConnectionCls = _Conn


class _HttpsPool(_PoolMixin, HTTPSConnectionPool):
    ConnectionCls = _HttpsConn


TRANSIENT = (  # what may pass on a second try; `ApiSession` raises these with its own text
    requests.Timeout,
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


# The variables requests' environment settings depend on for an http(s) URL.
_ENVIRONMENT = (
    *(name for base in ("http_proxy", "https_proxy", "all_proxy", "no_proxy") for name in (base, base.upper())),
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)
_environments: dict[tuple[object, ...], tuple[dict[str, str], str | None]] = {}


def _environment(url: str, no_proxy: str | None) -> tuple[dict[str, str], str | None]:
    """The proxies requests would take from the environment for this URL's scheme and host, and
    the CA bundle, computed once per value of the variables they come from."""
    parts = urlsplit(url)
    key = (parts.scheme, parts.netloc, no_proxy, *(os.environ.get(name) for name in _ENVIRONMENT))
    found = _environments.get(key)
    if found is None:
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        found = _environments[key] = (requests.utils.get_environ_proxies(url, no_proxy=no_proxy), bundle)
    return found


class ApiSession(requests.Session):
    """A session for API calls with a key: redirects are never followed (requests keeps
    Authorization on same-host redirects and custom headers such as X-Ometria-Auth on any),
    each request has a total deadline, and no exception leaving it carries a library's text
    (which may quote a header value or a URL): transient faults keep their type with a
    message of ours, everything else becomes `refused(message)`."""

    def __init__(
        self,
        *,
        refused: Callable[[str], Exception] | None = None,
        allow_private_network: bool = False,
        deadline_s: float | None = None,
    ) -> None:
        super().__init__()
        self.refused = refused or RequestRefused
        self.allow_private_network = allow_private_network
        self.deadline_s = deadline_s

    def merge_environment_settings(self, url: str, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict[str, Any]:
        """What requests reads from the environment (proxies, CA bundle), looked up by the few
        names that matter rather than by requests' scan of every variable on each request: where
        each client's key is a variable there are thousands, and the scans were most of a probe's
        CPU."""
        if not self.trust_env:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        no_proxy = proxies.get("no_proxy") if proxies is not None else None
        env_proxies, bundle = _environment(url, no_proxy)
        if proxies is not None:
            for k, v in env_proxies.items():
                proxies.setdefault(k, v)
        if verify is True or verify is None:
            verify = bundle or verify
        return {
            "proxies": requests.sessions.merge_setting(proxies, self.proxies),
            "stream": requests.sessions.merge_setting(stream, self.stream),
            "verify": requests.sessions.merge_setting(verify, self.verify),
            "cert": requests.sessions.merge_setting(cert, self.cert),
        }

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["allow_redirects"] = False
        kwargs["stream"] = True  # the body is read here, under the deadline
        timeout = kwargs.get("timeout")
        deadline = self.deadline_s or (sum(timeout) if isinstance(timeout, tuple) else float(timeout or 60.0))
        host = _host(url)
        watch = _Watch(self.allow_private_network)
        timer = threading.Timer(deadline, watch.expire)
        timer.daemon = True
        outer, _current.watch = getattr(_current, "watch", None), watch
        timer.start()
        try:
            resp = super().request(method, url, **kwargs)
            with resp:
                resp.content  # noqa: B018 - read now, within the deadline
        except Exception as exc:
            raise self._safe(exc, host, watch.expired, deadline) from None
        finally:
            timer.cancel()
            _current.watch = outer
        if watch.expired:  # a cut-off answer can look complete (headers ended, a close-delimited body)
            raise DeadlineExceeded(f"no complete answer from {host} within {deadline:g}s")
        if resp.is_redirect or 300 <= resp.status_code < 400:
            target = _host(urljoin(str(url), resp.headers.get("Location", "")))
            raise self.refused(
                f"{resp.status_code} redirect from {host} to {target} not followed (the key would go along); "
                "set base_url to where the API really is"
            )
        return resp

    def _safe(self, exc: Exception, host: str, expired: bool, deadline: float) -> Exception:
        if expired:
            return DeadlineExceeded(f"no complete answer from {host} within {deadline:g}s")
        if isinstance(exc, _AddressRefused):
            return self.refused(str(exc))
        if isinstance(exc, TRANSIENT):
            return type(exc)(f"{type(exc).__name__} talking to {host}")
        return self.refused(f"the request to {host} could not be sent ({type(exc).__name__})")


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def server_time(resp: requests.Response) -> datetime | None:
    """The Date header: the server's clock, not ours."""
    value = resp.headers.get("Date")
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).astimezone(UTC)
    except (TypeError, ValueError):
        return None


def json_object(resp: requests.Response) -> dict[str, Any] | None:
    """The body as a JSON object if it is one (an error answer's problem document), else None."""
    ctype = resp.headers.get("Content-Type", "")
    if "json" not in ctype:
        return None
    try:
        doc = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def pooled_session(
    pool_size: int,
    headers: dict[str, str],
    *,
    refused: Callable[[str], Exception] | None = None,
    allow_private_network: bool = False,
    deadline_s: float | None = None,
) -> ApiSession:
    """One keep-alive pool per account; `pool_block` makes threads wait for a connection.
    `deadline_s` bounds each request, answer included (default: its connect + read timeouts)."""
    session = ApiSession(refused=refused, allow_private_network=allow_private_network, deadline_s=deadline_s)
    session.headers.update({"User-Agent": "mc-pipeline/0.1 (+requests)", **headers})
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0, pool_block=True)
    adapter.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _HttpsPool}
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class HttpSettings(ConfigurableResource):
    """The settings both API resources share: timeouts and the retry policy."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    deadline_s: float | None = Field(
        default=None, gt=0, description="total time per request, answer included (default: connect + read timeouts)"
    )
    max_attempts: int = Field(
        default=6, ge=1, description="per request, for 5xx, timeouts, drops and unreadable bodies"
    )
    max_throttle_waits: int = Field(default=60, ge=0, description="per request, for throttling answers")
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0

    def retry_policy(self) -> HttpRetryPolicy:
        return HttpRetryPolicy(self.max_attempts, self.max_throttle_waits, self.backoff_base_s, self.backoff_cap_s)

    def timeouts(self) -> tuple[float, float]:
        return (self.connect_timeout_s, self.read_timeout_s)
