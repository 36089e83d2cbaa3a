"""Running the sandbox: in-process on a background thread (tests, demo) or in the foreground (CLI)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mc_pipeline.sandbox.app import build_app
from mc_pipeline.sandbox.clock import SandboxClock
from mc_pipeline.sandbox.config import Faults, SandboxConfig
from mc_pipeline.sandbox.mailchimp import MailchimpList
from mc_pipeline.sandbox.state import SandboxState

log = logging.getLogger("mc_pipeline.sandbox")


@dataclass(frozen=True)
class ClientKeys:
    client_id: str
    mailchimp_key: str
    ometria_key: str
    list_ids: tuple[str, ...]

    def __repr__(self) -> str:  # keys stay out of test output and logs
        return f"ClientKeys(client_id={self.client_id!r}, list_ids={self.list_ids!r}, keys=***)"


class Sandbox:
    """The Mailchimp and Ometria sandbox on one port. Use as a context manager:

        with Sandbox(SandboxConfig.generated(clients=2)) as sb:
            requests.get(f"{sb.mailchimp_url}/lists", auth=("x", sb.client("client-1").mailchimp_key))

    Everything a test needs is also here in Python: mutations, faults, the clock and the stats.
    """

    def __init__(self, config: SandboxConfig | None = None, *, clock: SandboxClock | None = None) -> None:
        self.config = config or SandboxConfig()
        self.state = SandboxState(self.config, clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Sandbox:
        # In-process, the sandbox shares its host's garbage collector (pytest, Dagster, the demo):
        # a full collection over every long-lived object stalls its event loop, stamps arrivals
        # late and fakes a rate-limit 429. Frozen, those objects are no longer walked.
        gc.collect()
        gc.freeze()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # surfaced to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="mc-pipeline-sandbox", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    async def _serve(self) -> None:
        self._runner = web.AppRunner(build_app(self.state), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=1024, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses
    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.port}"

    @property
    def mailchimp_url(self) -> str:
        return f"{self.base_url}/3.0"

    @property
    def ometria_url(self) -> str:
        return f"{self.base_url}/v2"

    # ------------------------------------------------------------------ accounts and data
    def client(self, client_id: str) -> ClientKeys:
        mc = self.state.mc_by_client[client_id]
        om = self.state.om_by_client[client_id]
        return ClientKeys(client_id, mc.api_key, om.api_key, tuple(lst.id for lst in mc.ordered_lists()))

    def clients(self) -> list[ClientKeys]:
        return [self.client(c) for c in self.state.mc_by_client]

    def mailchimp_list(self, list_id: str) -> MailchimpList:
        return self.state.lists[list_id]

    def add_list(self, client_id: str, list_id: str, name: str = "New audience", members: int = 100) -> MailchimpList:
        return self.state.add_list(client_id, list_id, name, members)

    @property
    def clock(self) -> SandboxClock:
        return self.state.clock

    def add_member(self, list_id: str, email: str, **kw: Any) -> dict[str, Any]:
        return self.mailchimp_list(list_id).add(email, clock=self.clock, **kw)

    def update_member(self, list_id: str, key: str, **kw: Any) -> dict[str, Any]:
        return self.mailchimp_list(list_id).update(key, clock=self.clock, **kw)

    def set_status(self, list_id: str, key: str, status: str) -> dict[str, Any]:
        return self.mailchimp_list(list_id).update(key, clock=self.clock, status=status)

    def delete_member(self, list_id: str, key: str) -> None:
        self.mailchimp_list(list_id).delete_permanently(key)

    def revoke(self, client_id: str, service: str = "mailchimp", revoked: bool = True) -> None:
        accounts = self.state.mc_by_client if service == "mailchimp" else self.state.om_by_client
        accounts[client_id].revoked = revoked

    # ------------------------------------------------------------------ faults
    def script_faults(self, target: str, kinds: list[str]) -> None:
        """`target`: 'mailchimp', 'ometria', a list id, or a client id (its Ometria account)."""
        self.state.faults.script(target, kinds)

    def set_fault_rates(self, target: str, faults: Faults | None) -> None:
        self.state.faults.set_rates(target, faults)

    # ------------------------------------------------------------------ inspection
    def stats(self, label: str | None = None) -> dict[str, Any]:
        """Per-key counters; `label` is 'mailchimp:<client>' or 'ometria:<client>'."""
        snap = self.state.stats.snapshot()
        if label is None:
            return snap
        return snap.get(label, self.state.stats.key(label).as_dict())

    def request_log(self, label: str) -> list[Any]:
        return list(self.state.stats.key(label).log)

    def ometria_contacts(self, client_id: str, collection: str | None = None) -> dict[str, dict[str, Any]]:
        """Contacts stored for `client_id`: `{id: record}` of one collection, or of all merged."""
        snap = self.state.om_by_client[client_id].snapshot(collection)
        if collection is not None:
            return snap[collection]
        return {f"{c}/{rid}": rec for c, recs in snap.items() for rid, rec in recs.items()}

    def ometria_unsubscribe(self, client_id: str, collection: str, contact_id: str, forced: bool = False) -> None:
        """The contact opts out in Ometria itself: its unsubscribe link (`forced`: its preference centre)."""
        self.state.om_by_client[client_id].unsubscribe(collection, contact_id, self.clock.now_dt().isoformat(), forced)

    def ometria_subscription(self, client_id: str, collection: str, contact_id: str) -> dict[str, Any]:
        """How a contact's `marketing_optin` came to be: listings, forced status, events fired."""
        return self.state.om_by_client[client_id].subscription(collection, contact_id)

    def ometria_writes(self, client_id: str) -> int:
        return self.state.om_by_client[client_id].writes

    def reset_stats(self) -> None:
        self.state.stats.reset()


def serve_forever(config: SandboxConfig, on_listening: Callable[[], None] | None = None) -> None:
    """Foreground server for the CLI and docker-compose; Ctrl-C stops it.

    `on_listening` is called once the port accepts connections (generating the members comes
    first and takes seconds), so an announcement made there is true when a user reads it.
    """
    state = SandboxState(config)
    web.run_app(
        build_app(state),
        host=config.host,
        port=config.port or 8080,
        access_log=None,
        # aiohttp calls `print` once every site listens: the moment to announce.
        print=(lambda _banner: on_listening()) if on_listening else None,
        handler_cancellation=True,
    )
