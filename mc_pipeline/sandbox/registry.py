"""Pointing the pipeline at a sandbox: a client registry and an env file with the sandbox's keys."""

from __future__ import annotations

import re
from pathlib import Path

from mc_pipeline.network import is_loopback_url
from mc_pipeline.registry import write_registry
from mc_pipeline.sandbox.config import SandboxConfig


def key_env_names(client_id: str) -> tuple[str, str]:
    """The environment variables that hold one sandbox client's keys."""
    stem = re.sub(r"[^A-Z0-9]", "_", client_id.upper())
    return f"MC_SANDBOX_{stem}_MAILCHIMP_KEY", f"MC_SANDBOX_{stem}_OMETRIA_KEY"


def registry_entries(config: SandboxConfig, base_url: str) -> list[dict[str, object]]:
    # A sandbox off this host (a compose service) is on a private network over plain http: say so.
    private = {} if is_loopback_url(base_url) else {"allow_private_network": True}
    entries: list[dict[str, object]] = []
    for acc in config.accounts:
        mc_env, om_env = key_env_names(acc.client_id)
        entries.append(
            {
                "id": acc.client_id,
                "mailchimp": {"api_key": {"env": mc_env}, "base_url": f"{base_url}/3.0", **private},
                "ometria": {"api_key": {"env": om_env}, "base_url": f"{base_url}/v2", **private},
                "lists": [spec.id for spec in acc.lists],
            }
        )
    return entries


def key_environment(config: SandboxConfig) -> dict[str, str]:
    env: dict[str, str] = {}
    for acc in config.accounts:
        mc_env, om_env = key_env_names(acc.client_id)
        env[mc_env] = acc.mailchimp_key or ""
        env[om_env] = acc.ometria_key or ""
    return env


def write_pipeline_files(config: SandboxConfig, base_url: str, registry: Path, env_file: Path | None) -> None:
    """The registry refers to keys by variable name; the env file (mode 600) holds the values."""
    write_registry(registry, registry_entries(config, base_url))
    if env_file is not None:
        env_file.write_text("".join(f"{k}={v}\n" for k, v in key_environment(config).items()), encoding="utf-8")
        env_file.chmod(0o600)
