"""The API session both clients use: no redirect followed, the peer's address checked, a total
deadline per request, and no library exception text (which can quote a key) in any error."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest
from pydantic import SecretStr

from mc_pipeline.resources.errors import MailchimpRequestError, MailchimpUnavailable, OmetriaRequestError
from mc_pipeline.resources.http import DeadlineExceeded, RequestRefused, pooled_session
from mc_pipeline.resources.mailchimp import MailchimpClient
from mc_pipeline.resources.ometria import OmetriaClient, PushStats
from mc_pipeline.resources.retry import HttpRetryPolicy

KEY = "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f-us6"
OM_KEY = "om-HTTP-TEST-KEY-77"
FAST = HttpRetryPolicy(max_attempts=2, max_throttle_waits=0, backoff_base_s=0.01, backoff_cap_s=0.02)


class Server:
    """A loopback HTTP server whose answer per path the test sets; it records each request's headers."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.seen.append((self.path, dict(self.headers)))
                server.answer(self)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        if path.startswith("/redirect-to/"):
            h.send_response(302)
            h.send_header("Location", unquote(path.removeprefix("/redirect-to/")).replace("|", "/"))
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif path == "/drip-body":  # headers at once, then a byte now and then: each read is quick
            h.send_response(200)
            h.send_header("Content-Length", "100000")
            h.end_headers()
            self._drip(h)
        elif path == "/drip-headers":
            h.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._drip(h, b"X-A: a\r\n")
        else:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "2")
            h.end_headers()
            h.wfile.write(b"{}")

    def _drip(self, h: BaseHTTPRequestHandler, chunk: bytes = b"x") -> None:
        while not self.stop.wait(0.05):
            try:
                h.wfile.write(chunk)
                h.wfile.flush()
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture
def other_host() -> Iterator[Server]:
    s = Server("127.0.0.2")  # another host on the loopback network
    yield s
    s.close()


def test_redirects_are_never_followed_and_name_the_target(server: Server, other_host: Server) -> None:
    session = pooled_session(2, {"X-Ometria-Auth": OM_KEY})
    session.auth = ("mc-pipeline", KEY)
    for target, host in ((f"{other_host.url}|x", "127.0.0.2"), ("|same-host", "127.0.0.1")):
        with pytest.raises(RequestRefused, match=f"302 redirect from 127.0.0.1 to {host} not followed"):
            session.get(f"{server.url}/redirect-to/{target}", timeout=(2, 2))
    assert other_host.seen == []  # neither key went along
    assert len(server.seen) == 2  # one request each: no redirect followed, even to the same host


def test_the_clients_turn_a_redirect_into_their_own_non_retryable_error(server: Server, other_host: Server) -> None:
    mc = MailchimpClient(
        client_id="acme",
        api_key=SecretStr(KEY),
        base_url=f"{server.url}/redirect-to/{other_host.url}|3.0",
        max_connections=2,
        page_size=10,
        timeout=(2, 2),
        policy=FAST,
    )
    with pytest.raises(MailchimpRequestError, match=r"client 'acme', list 0123456789: 302 redirect .* 127.0.0.2"):
        mc.get("/lists/0123456789/members", {}, list_id="0123456789", stats=_stats())
    om = OmetriaClient(
        client_id="acme",
        api_key=SecretStr(OM_KEY),
        base_url=f"{server.url}/redirect-to/{other_host.url}|v2",
        requests_per_second=50,
        timeout=(2, 2),
        policy=FAST,
        pool_size=1,
    )
    with pytest.raises(OmetriaRequestError, match=r"client 'acme': 302 redirect .* 127.0.0.2") as caught:
        om.push(b"[]", 0, PushStats())
    assert not caught.value.retryable
    assert len(server.seen) == 2 and other_host.seen == []  # refused at once, not retried


@pytest.mark.parametrize("path", ["/drip-body", "/drip-headers"])
def test_a_slow_drip_answer_ends_at_the_deadline(server: Server, path: str) -> None:
    session = pooled_session(1, {}, deadline_s=0.6)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"no complete answer from 127\.0\.0\.1 within 0\.6s"):
        session.get(f"{server.url}{path}", timeout=(2, 2))  # each read is far quicker than 2 s
    assert time.monotonic() - started < 1.5
    assert session.get(f"{server.url}/ok", timeout=(2, 2)).content == b"{}"  # the pool is still usable


def test_the_default_deadline_is_connect_plus_read_and_the_client_retries_it(server: Server) -> None:
    mc = MailchimpClient(
        client_id="acme",
        api_key=SecretStr(KEY),
        base_url=server.url,
        max_connections=1,
        page_size=10,
        timeout=(0.2, 0.3),
        policy=FAST,
    )
    started = time.monotonic()
    with pytest.raises(MailchimpUnavailable, match="gave up after 2 attempts; last cause: DeadlineExceeded"):
        mc.get("/drip-body", {}, list_id="0123456789", stats=_stats())
    assert time.monotonic() - started < 2.5


def _local_non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_a_private_peer_is_refused_unless_allowed() -> None:
    address = _local_non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback interface")
    s = Server("0.0.0.0")
    try:
        url = f"http://{address}:{s.httpd.server_port}/ok"
        with pytest.raises(RequestRefused, match=f"resolved to {address} is a private or non-public address"):
            pooled_session(1, {"X-Ometria-Auth": OM_KEY}).get(url, timeout=(2, 2))
        assert s.seen == []  # refused on connect, before a byte of the request was sent
        assert pooled_session(1, {}, allow_private_network=True).get(url, timeout=(2, 2)).status_code == 200
    finally:
        s.close()


@pytest.mark.parametrize("bad", [f"{OM_KEY}\n", f"{OM_KEY}\r\nX-Injected: 1", f" {OM_KEY}", f"{OM_KEY}\u2028"])
def test_no_library_text_leaves_the_session(server: Server, bad: str) -> None:
    """requests quotes a refused header value in its exception; the session never passes that on."""
    with pytest.raises(RequestRefused) as caught:
        pooled_session(1, {"X-Ometria-Auth": bad}).get(f"{server.url}/ok", timeout=(2, 2))
    assert OM_KEY not in str(caught.value) and "HTTP-TEST" not in repr(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert "could not be sent" in str(caught.value)


def test_transient_errors_keep_their_type_with_our_text() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it
    import requests

    with pytest.raises(requests.ConnectionError) as caught:
        pooled_session(1, {}).get(f"http://127.0.0.1:{port}/3.0/lists?apikey=SECRETQUERY", timeout=(1, 1))
    assert str(caught.value) == "ConnectionError talking to 127.0.0.1"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def _stats():
    from mc_pipeline.resources.mailchimp import FetchStats

    return FetchStats()


def test_the_environment_is_read_once_per_host_not_on_every_request(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests scans every environment variable for proxies on each request; where each
    client's key is a variable there are thousands, and the scans were most of a probe's CPU.
    The proxy settings still hold: NO_PROXY sends this host past the (dead) proxy."""
    import requests

    scans = []
    real = requests.utils.get_environ_proxies

    def counted(*args: object, **kwargs: object) -> object:
        scans.append(1)
        return real(*args, **kwargs)

    for module in (requests.utils, requests.sessions):  # requests.sessions imported it by name
        monkeypatch.setattr(module, "get_environ_proxies", counted)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for _ in range(3):  # a session per account and tick: the environment once for all of them
        session = pooled_session(1, {})
        for _ in range(3):
            assert session.get(f"{server.url}/ok", timeout=(2, 2)).status_code == 200
    assert len(scans) == 1
    monkeypatch.setenv("NO_PROXY", "localhost")  # changed: read anew, and this host now goes to the proxy
    with pytest.raises(requests.ConnectionError):
        pooled_session(1, {}).get(f"{server.url}/ok", timeout=(2, 2))
    assert len(scans) == 2
