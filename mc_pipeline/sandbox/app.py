"""The sandbox's aiohttp application: one sub-application per service on one port.

Mailchimp under /3.0 (sandbox/mailchimp_routes.py), Ometria under /v2 (sandbox/ometria_routes.py)
and the sandbox's own API under /_sandbox (sandbox/admin_routes.py). Each service's wire
behaviour (auth, limits, faults, latency, accounting) is its sub-application's middlewares, so
every endpoint of a service behaves alike; the shared state is the `STATE` app key.
"""

from __future__ import annotations

from aiohttp import web

from mc_pipeline.sandbox.admin_routes import admin_app
from mc_pipeline.sandbox.mailchimp_routes import mailchimp_app
from mc_pipeline.sandbox.ometria_routes import ometria_app
from mc_pipeline.sandbox.state import STATE, SandboxState


def build_app(state: SandboxState) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[STATE] = state
    app.add_subapp("/3.0", mailchimp_app())
    app.add_subapp("/v2", ometria_app())
    app.add_subapp("/_sandbox", admin_app())
    return app
