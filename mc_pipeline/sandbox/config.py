"""Sandbox configuration: accounts, lists, latency and faults, from Python, CLI flags or YAML.

Keys that are not given are derived from the seed, so a config file can stay free of secrets
and two processes started with the same seed agree on every key and member.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

FaultKind = Literal[
    "500",  # internal server error
    "503",  # service unavailable
    "504",  # gateway timeout, after `gateway_delay_s`
    "429",  # throttled
    "403_throttle",  # Mailchimp's bare 403 throttle (title "Too Many Requests"-like, see server)
    "402",  # Ometria: a quota-type refusal
    "drop",  # connection closed without an answer
    "truncate",  # 200 with a JSON body cut short (Content-Length matches the cut body)
    "slow",  # answer after `slow_delay_s`, longer than any sane client timeout
    "store_then_drop",  # Ometria only: the batch is stored, then the connection is dropped
    "store_then_slow",  # Ometria only: the batch is stored, the answer comes after `slow_delay_s`
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Latency(_Strict):
    """Per-request latency: `base_ms` plus `per_kb_ms` for every KiB served, plus uniform jitter."""

    base_ms: float = 0.0
    per_kb_ms: float = 0.0
    jitter_ms: float = 0.0

    def seconds(self, nbytes: int, jitter: float) -> float:
        """`jitter` is a uniform draw in [0, 1)."""
        return (self.base_ms + self.per_kb_ms * nbytes / 1024.0 + self.jitter_ms * jitter) / 1000.0


class Faults(_Strict):
    """Probabilistic faults, drawn per request from the sandbox's seeded generator."""

    error_rate: float = Field(default=0.0, ge=0, le=1, description="share of requests answered 500 or 503")
    gateway_timeout_rate: float = Field(default=0.0, ge=0, le=1, description="share answered 504 after a delay")
    drop_rate: float = Field(default=0.0, ge=0, le=1, description="share whose connection is dropped")
    truncate_rate: float = Field(default=0.0, ge=0, le=1, description="share answered with a cut JSON body")
    slow_rate: float = Field(default=0.0, ge=0, le=1, description="share answered after slow_delay_s")
    gateway_delay_s: float = 1.0
    slow_delay_s: float = 30.0

    def any(self) -> bool:
        return any((self.error_rate, self.gateway_timeout_rate, self.drop_rate, self.truncate_rate, self.slow_rate))


class ListSpec(_Strict):
    id: str | None = Field(default=None, pattern=r"^[0-9a-f]{10}$")
    name: str | None = None
    members: int = Field(default=1000, ge=0)
    faults: Faults | None = None


class AccountSpec(_Strict):
    """One client: a Mailchimp account (one API key) and an Ometria account (one API key)."""

    client_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    mailchimp_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}-[a-z]+[0-9]+$")
    ometria_key: str | None = Field(default=None, min_length=8)
    dc: str = Field(default="us6", pattern=r"^[a-z]+[0-9]+$")
    lists: list[ListSpec] = Field(default_factory=list)


class MailchimpSettings(_Strict):
    max_in_flight: int = Field(default=10, ge=1, description="simultaneous requests per API key before 429")
    latency: Latency = Field(default_factory=Latency)
    faults: Faults = Field(default_factory=Faults)


class OmetriaSettings(_Strict):
    rate_per_second: int = Field(default=8, ge=1, description="requests per sliding second per key before 429")
    backlog_limit: int = Field(default=50_000, ge=1, description="records queued for processing before 429")
    drain_per_second: float = Field(default=5_000.0, gt=0, description="records the queue processes per second")
    max_records: int = 100
    max_record_bytes: int = 60 * 1024
    reject_email_pattern: str | None = Field(
        default=None, description="a regex: contacts whose email matches are rejected (a stricter server-side rule)"
    )
    late_reject_email_pattern: str | None = Field(
        default=None,
        description="a regex: contacts whose email matches are accepted by the answer, then fail validation "
        "while processed (not stored; listed at /push/_errors)",
    )
    latency: Latency = Field(default_factory=Latency)
    faults: Faults = Field(default_factory=Faults)


class SandboxConfig(_Strict):
    seed: int = 42
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    mailchimp: MailchimpSettings = Field(default_factory=MailchimpSettings)
    ometria: OmetriaSettings = Field(default_factory=OmetriaSettings)
    accounts: list[AccountSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fill_keys_and_ids(self) -> SandboxConfig:
        seen: set[str] = set()
        for account in self.accounts:
            if account.client_id in seen:
                raise ValueError(f"duplicate client_id {account.client_id!r}")
            seen.add(account.client_id)
            if account.mailchimp_key is None:
                account.mailchimp_key = f"{derive_hex(self.seed, 'mc-key', account.client_id, n=32)}-{account.dc}"
            if account.ometria_key is None:
                account.ometria_key = derive_hex(self.seed, "om-key", account.client_id, n=32)
            for i, spec in enumerate(account.lists):
                if spec.id is None:
                    spec.id = derive_hex(self.seed, "list", account.client_id, str(i), n=10)
                if spec.name is None:
                    spec.name = f"{account.client_id.title()} audience {i + 1}"
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> SandboxConfig:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return cls.model_validate(data)

    @classmethod
    def generated(
        cls,
        *,
        clients: int = 1,
        lists_per_client: int = 2,
        members: Annotated[list[int] | int, "sizes, cycled over each client's lists"] = 1000,
        seed: int = 42,
        **kwargs: object,
    ) -> SandboxConfig:
        """Shorthand: `clients` accounts named client-1..N, each with `lists_per_client` lists."""
        sizes = members if isinstance(members, list) else [members]
        accounts = [
            AccountSpec(
                client_id=f"client-{c + 1}",
                lists=[ListSpec(members=sizes[i % len(sizes)]) for i in range(lists_per_client)],
            )
            for c in range(clients)
        ]
        return cls.model_validate({"seed": seed, "accounts": accounts, **kwargs})


def derive_hex(seed: int, *parts: str, n: int) -> str:
    """Deterministic hex string from the seed and a purpose, so keys and ids are stable across runs."""
    digest = hashlib.sha256(":".join((str(seed), *parts)).encode()).hexdigest()
    while len(digest) < n:
        digest += hashlib.sha256(digest.encode()).hexdigest()
    return digest[:n]


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    """`mc-pipeline sandbox`'s flags (or its `--config` file) as a config."""
    # The seed goes in before validation: keys and list ids that are not given derive from it.
    if args.config:
        data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        if args.seed is not None:
            data["seed"] = args.seed
        config = SandboxConfig.model_validate(data)
    else:
        sizes = [int(x) for x in str(args.members).split(",") if x]
        seed = 42 if args.seed is None else args.seed
        config = SandboxConfig.generated(clients=args.clients, lists_per_client=args.lists, members=sizes, seed=seed)
    overrides = {"host": args.host}
    if args.port is not None:
        overrides["port"] = args.port
    config = config.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if args.mc_latency_ms is not None or args.mc_per_kb_ms is not None:
        config.mailchimp.latency = Latency(base_ms=args.mc_latency_ms or 0, per_kb_ms=args.mc_per_kb_ms or 0)
    if args.om_latency_ms is not None:
        config.ometria.latency = Latency(base_ms=args.om_latency_ms)
    if args.error_rate or args.drop_rate or args.truncate_rate:
        rates = Faults(error_rate=args.error_rate, drop_rate=args.drop_rate, truncate_rate=args.truncate_rate)
        config.mailchimp.faults = rates
        config.ometria.faults = rates
    return config
