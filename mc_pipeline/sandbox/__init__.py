"""Local Mailchimp Marketing API v3 and Ometria Data API servers, faithful on the wire.

The pipeline talks to it exactly as to the real APIs; only base URLs and keys differ.
"""

from mc_pipeline.sandbox.clock import SandboxClock
from mc_pipeline.sandbox.config import AccountSpec, Faults, Latency, ListSpec, SandboxConfig
from mc_pipeline.sandbox.runner import ClientKeys, Sandbox, serve_forever

__all__ = [
    "AccountSpec",
    "ClientKeys",
    "Faults",
    "Latency",
    "ListSpec",
    "Sandbox",
    "SandboxClock",
    "SandboxConfig",
    "serve_forever",
]
