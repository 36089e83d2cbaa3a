"""What the sandbox's three sub-applications share: accounts, lists, faults, clock and stats.

Handlers and middlewares reach it as `request.config_dict[STATE]`; per-request facts the
middlewares pass inward (the caller's account, the fault drawn, the request id) live under the
request keys below.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mc_pipeline.sandbox.clock import SandboxClock
from mc_pipeline.sandbox.config import SandboxConfig
from mc_pipeline.sandbox.faults import FaultPlan
from mc_pipeline.sandbox.generate import MemberFactory
from mc_pipeline.sandbox.mailchimp import MailchimpList, SandboxMailchimpAccount
from mc_pipeline.sandbox.ometria import SandboxOmetriaAccount
from mc_pipeline.sandbox.stats import Stats


class SandboxState:
    """Everything the handlers share. Built once from the config; tests reach it through `Sandbox`."""

    def __init__(self, config: SandboxConfig, clock: SandboxClock | None = None) -> None:
        self.config = config
        self.clock = clock or SandboxClock()
        self.stats = Stats()
        self.faults = FaultPlan(config.seed, {"mailchimp": config.mailchimp.faults, "ometria": config.ometria.faults})
        self.mc_by_key: dict[str, SandboxMailchimpAccount] = {}
        self.mc_by_client: dict[str, SandboxMailchimpAccount] = {}
        self.om_by_key: dict[str, SandboxOmetriaAccount] = {}
        self.om_by_client: dict[str, SandboxOmetriaAccount] = {}
        self.lists: dict[str, MailchimpList] = {}
        # Generated members end at least a day before start-up so a run's window includes all of
        # them. The epoch is a UTC midnight, not the start-up second: two sandboxes with the same
        # seed started the same day serve identical members, timestamps included.
        epoch = self.clock.now_s() // 86400 * 86400 - 86400
        for acc in config.accounts:
            assert acc.mailchimp_key and acc.ometria_key  # filled by the config's validator
            mc = SandboxMailchimpAccount(client_id=acc.client_id, api_key=acc.mailchimp_key, dc=acc.dc)
            for n, spec in enumerate(acc.lists):
                assert spec.id and spec.name
                factory = MemberFactory(config.seed, spec.id, acc.dc, epoch)
                lst = MailchimpList(mc, spec.id, spec.name, factory, spec.members, created=epoch - 400 * 86400 + n)
                mc.lists[spec.id] = lst
                self.lists[spec.id] = lst
                if spec.faults is not None:
                    self.faults.set_rates(spec.id, spec.faults)
            self.mc_by_key[mc.api_key] = mc
            self.mc_by_client[acc.client_id] = mc
            om = SandboxOmetriaAccount(client_id=acc.client_id, api_key=acc.ometria_key, settings=config.ometria)
            self.om_by_key[om.api_key] = om
            self.om_by_client[acc.client_id] = om

    def add_list(self, client_id: str, list_id: str, name: str, members: int) -> MailchimpList:
        mc = self.mc_by_client[client_id]
        if list_id in self.lists:
            raise ValueError(f"list {list_id} exists")
        factory = MemberFactory(self.config.seed, list_id, mc.dc, self.clock.now_s() - 60)
        lst = MailchimpList(mc, list_id, name, factory, members, created=self.clock.now_s())
        mc.lists[list_id] = lst
        self.lists[list_id] = lst
        return lst


STATE = web.AppKey("state", SandboxState)
# Per request, set by the middlewares (sandbox/middlewares.py) for those inside them.
ACCOUNT: web.RequestKey[Any] = web.RequestKey("account", object)  # the caller's account, or None
FAULT = web.RequestKey("fault", str)  # the fault kind drawn for this request, if any
STARTED = web.RequestKey("started", float)  # time.monotonic() when the sandbox took the request
