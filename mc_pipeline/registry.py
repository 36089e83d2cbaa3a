"""Clients and their lists: which partitions exist and whose credentials each one uses.

The registry holds references to secrets (an environment variable or a file), never the
secrets. `YamlClientRegistry` is the one implementation and every caller uses it by name; a
database-backed registry would give the same three methods (`clients`, `client`, `removes`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from mc_pipeline.network import api_url

# Every pattern matches a whole value. Python's `$` also matches before a final newline (so
# 'acme:1a2d7ebf82\n' passed), hence `\A...\Z` in the compiled patterns; pydantic's `pattern=`
# runs Rust's regex, which has no `\Z` and whose `$` is the end of the text: it gets `^...$`.
_CLIENT_ID, _LIST_ID, _ENV_NAME = r"[a-z0-9][a-z0-9-]{0,62}", r"[0-9a-f]{10}", r"[A-Za-z_][A-Za-z0-9_]*"
CLIENT_ID_RE = re.compile(rf"\A{_CLIENT_ID}\Z")
LIST_ID_RE = re.compile(rf"\A{_LIST_ID}\Z")
ENV_NAME_PATTERN = f"^{_ENV_NAME}$"  # for pydantic (Rust regex)
MAILCHIMP_KEY_RE = re.compile(r"\A[0-9a-f]{32}-([a-z]+[0-9]+)\Z")

ClientId = Annotated[str, Field(pattern=f"^{_CLIENT_ID}$", description="lower-case slug")]
ListId = Annotated[str, Field(pattern=f"^{_LIST_ID}$", description="Mailchimp list id: 10 hex digits")]


class RegistryError(ValueError):
    """A registry that cannot be used; the message names the file, line, client and field."""


class SecretError(RuntimeError):
    """A secret that cannot be used; names the reference (and the client and field), never a value."""

    def __init__(self, cause: str, *, client_id: str | None = None, field: str | None = None) -> None:
        super().__init__(f"client {client_id!r} field {field}: {cause}" if client_id else cause)
        self.cause = cause
        self.client_id = client_id
        self.field = field


# A key is printable ASCII without spaces: anything else is a copy-paste or file-format accident, and
# would reach the HTTP library (whose errors quote header values) or the server's logs.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


class SecretRef(BaseModel):
    """Where a key lives: `{env: NAME}` or `{file: /run/secrets/name}`. Exactly one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(default=None, pattern=ENV_NAME_PATTERN)
    file: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' (a variable name) or 'file' (a path)")
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"secret file {self.file}"

    def resolve(self, pattern: re.Pattern[str] | None = None, shape: str = "") -> SecretStr:
        """The key, stripped of surrounding whitespace (a file's or a variable's trailing newline);
        refused if empty, if it holds whitespace, control or non-ASCII characters inside, or if it
        does not have the expected `shape` (`pattern`, a full match)."""
        if self.env is not None:
            raw = os.environ.get(self.env)
            if raw is None:
                raise SecretError(f"{self.describe()} is not set")
        else:
            try:
                raw = Path(self.file or "").read_text(encoding="utf-8")
            except OSError as exc:
                raise SecretError(f"{self.describe()} cannot be read ({exc.strerror})") from None
            except UnicodeDecodeError:
                raise SecretError(f"{self.describe()} is not UTF-8 text") from None
        value = raw.strip()
        if not value:
            raise SecretError(f"{self.describe()} is empty")
        if not _KEY_CHARS.fullmatch(value):
            at, bad = next((i, c) for i, c in enumerate(value) if not _KEY_CHARS.fullmatch(c))
            kind = (
                "whitespace" if bad.isspace() else "a non-ASCII character" if ord(bad) > 127 else "a control character"
            )
            raise SecretError(
                f"{self.describe()} holds {kind} inside the key (character {at + 1}); a key is printable ASCII"
            )
        if pattern is not None and not pattern.fullmatch(value):
            raise SecretError(f"{self.describe()} is not {shape or 'a key of the expected form'}")
        return SecretStr(value)


@dataclass(frozen=True)
class Credentials:
    """Both accounts' keys of a client, validated and normalised."""

    mailchimp: SecretStr
    ometria: SecretStr


def _base_url(v: str | None) -> str | None:
    # Its form here; whether its host may be used depends on allow_private_network: ApiAccount._hosts.
    return api_url(v, allow_private_network=True) if v is not None else None


class ApiAccount(BaseModel):
    """What both accounts share: where their key may be sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str | None = None
    allow_private_network: bool = Field(
        default=False,
        description="let base_url (and its DNS answers) be a private or link-local address, over http too: "
        "a proxy or the compose sandbox; never needed for the real APIs",
    )

    @model_validator(mode="after")
    def _hosts(self) -> Self:
        if self.base_url is not None:
            try:
                api_url(self.base_url, self.allow_private_network)
            except ValueError as exc:
                raise ValueError(f"base_url: {exc}") from None
        return self


class MailchimpAccount(ApiAccount):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: SecretRef
    base_url: str | None = Field(default=None, description="overrides the datacenter URL, e.g. the sandbox's")
    max_connections: int = Field(default=10, ge=1, le=10, description="Mailchimp allows 10 simultaneous per account")
    account: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="names an account shared by several clients (run limits)",
    )

    _url = field_validator("base_url")(lambda v: _base_url(v))

    def resolve_key(self) -> SecretStr:
        return self.api_key.resolve(MAILCHIMP_KEY_RE, "a Mailchimp key: 32 hex digits, '-', the datacenter (e.g. us6)")


class OmetriaAccount(ApiAccount):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: SecretRef
    base_url: str | None = None
    requests_per_second: float = Field(
        default=8.0, gt=0, le=100.0, description="Ometria's push limit: 8 unless Ometria raised it for the plan"
    )
    account: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="names an account shared by several clients (run limits)",
    )
    force_optin: bool = Field(
        default=False,
        description="push subscribed members with @force_optin: it overrides every opt-out the person made in "
        "Ometria (unsubscribe link, preference centre) at each push; only for a list that is the one authority on "
        "consent (see transform.py)",
    )

    _url = field_validator("base_url")(lambda v: _base_url(v))

    def resolve_key(self) -> SecretStr:
        return self.api_key.resolve()


class Client(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: ClientId
    mailchimp: MailchimpAccount
    ometria: OmetriaAccount
    lists: list[ListId] | Literal["all"]
    collection_prefix: str = Field(default="mailchimp", pattern=r"^[A-Za-z0-9_.-]{1,40}$")

    @field_validator("lists")
    @classmethod
    def _unique(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list):
            dupes = sorted({x for x in v if v.count(x) > 1})
            if dupes:
                raise ValueError(f"list ids repeated: {dupes}")
        return v

    def credentials(self) -> Credentials:
        """Both accounts' keys, read and checked now (before any request); SecretError names the field."""
        keys = {}
        for name, account in (("mailchimp", self.mailchimp), ("ometria", self.ometria)):
            try:
                keys[name] = account.resolve_key()
            except SecretError as exc:
                raise SecretError(exc.cause, client_id=self.id, field=f"{name}.api_key") from None
        return Credentials(**keys)

    def collection(self, list_id: str) -> str:
        """Ometria `@collection` for one Mailchimp list: one collection per client list."""
        return f"{self.collection_prefix}-{list_id}"


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    removed: list[str] = Field(
        default=[],
        description="client ids or `client:list` keys taken out on purpose: the sensor deletes their partitions "
        "however many they are (a registry that shrinks by half or more otherwise is held as a possibly cut file)",
    )
    clients: list[Client]

    @model_validator(mode="after")
    def _consistent(self) -> RegistryFile:
        seen: set[str] = set()
        for c in self.clients:
            if c.id in seen:
                raise ValueError(f"client id {c.id!r} appears more than once")
            seen.add(c.id)
        for entry in self.removed:
            if not CLIENT_ID_RE.fullmatch(entry):
                parse_partition_key(entry)  # the message says what a key looks like
            if entry in seen or self.holds(entry):
                raise ValueError(f"{entry!r} is under `removed` but still in `clients`")
        if not self.clients and not self.removed:
            raise ValueError(
                "no clients: refused, since a file being rewritten or cut short reads like this. "
                "To remove every client on purpose, write `clients: []` and name them under `removed:`"
            )
        return self

    def holds(self, key: str) -> bool:
        """Whether the `client:list` key is in a client's explicit `lists`."""
        client_id, _, list_id = key.partition(":")
        return any(c.id == client_id and isinstance(c.lists, list) and list_id in c.lists for c in self.clients)

    def removes(self, key: str) -> bool:
        """Whether a partition's deletion was asked for under `removed` (by its client or its key)."""
        return key in self.removed or key.partition(":")[0] in self.removed


# --------------------------------------------------------------------------- partition keys
def partition_key(client_id: str, list_id: str) -> str:
    return f"{client_id}:{list_id}"


def parse_partition_key(key: str) -> tuple[str, str]:
    """`acme:1a2d7ebf82` -> ("acme", "1a2d7ebf82"); refuses anything that is not exactly that shape."""
    client_id, sep, list_id = key.partition(":")
    if not sep or not CLIENT_ID_RE.fullmatch(client_id) or not LIST_ID_RE.fullmatch(list_id):
        raise ValueError(
            f"partition key {key[:120]!r} is not '<client_id>:<list_id>' "
            "(client id: lower-case letters, digits and '-'; list id: 10 hex digits)"
        )
    return client_id, list_id


class YamlClientRegistry:
    """The registry as a YAML file, validated whole on first use: one bad entry refuses the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @cached_property
    def _data(self) -> RegistryFile:
        return load_registry_file(self.path)

    def clients(self) -> list[Client]:
        return list(self._data.clients)

    def client(self, client_id: str) -> Client:
        for c in self._data.clients:
            if c.id == client_id:
                return c
        raise KeyError(f"client {client_id!r} is not in the registry {self.path}")

    def removes(self, key: str) -> bool:
        return self._data.removes(key)

    def __iter__(self) -> Iterator[Client]:
        return iter(self._data.clients)


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: thousands of lists parse fast


# The last file validated, per path: a tick of the schedule and of the sensor read the registry
# each time (thousands of clients validate in seconds), and it rarely changes between them. The
# text is read and compared every time, so a changed file is always validated anew.
_validated: dict[Path, tuple[str, RegistryFile]] = {}


def load_registry_file(path: Path) -> RegistryFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the client registry ({exc.strerror})") from None
    cached = _validated.get(path)
    if cached is not None and cached[0] == text:
        return cached[1]
    registry = _validate(path, text)
    _validated[path] = (text, registry)
    return registry


def _validate(path: Path, text: str) -> RegistryFile:
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from None
    if data is None:  # nothing but blanks or comments: how a file being rewritten in place reads
        raise RegistryError(
            f"{path}: the client registry is empty: refused (no partition is changed for a file being rewritten); "
            "write files whole (a temporary file, then a rename)"
        )
    try:
        return RegistryFile.model_validate(data)
    except ValidationError as exc:
        # Only now is the text composed again, to find the line of each problem.
        root = yaml.compose(text, Loader=_Loader)
        raise RegistryError(_describe(path, root, data, exc)) from None


def _describe(path: Path, root: yaml.Node | None, data: object, exc: ValidationError) -> str:
    """One line per problem: file:line, the client by id, the field path, and what is wrong."""
    lines = []
    errors = exc.errors(include_url=False, include_input=False)
    union_branches = ("list[constrained-str]", "literal['all']")
    for err in errors:
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p in union_branches)]
        if err["type"] == "literal_error" and any(
            e is not err and len(e["loc"]) > len(err["loc"]) and e["loc"][: len(loc)] == tuple(loc) for e in errors
        ):
            continue  # `lists: [...]` failed as a list; that it is not 'all' either is noise
        line = _line_of(root, loc)
        client = ""
        if len(loc) >= 2 and loc[0] == "clients" and isinstance(loc[1], int) and isinstance(data, dict):
            entries = data.get("clients") or []
            entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
            cid = entry.get("id") if isinstance(entry, dict) else None
            client = f" client {cid!r}" if cid else f" client #{loc[1] + 1}"
            loc = loc[2:]
        field = ".".join(str(p) for p in loc) or "(entry)"
        where = f"{path}:{line}" if line else str(path)
        lines.append(f"{where}:{client} field {field}: {err['msg']}")
    return "invalid client registry:\n  " + "\n  ".join(lines)


def _line_of(node: yaml.Node | None, loc: Sequence[object]) -> int | None:
    best = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        if node is None:
            break
        best = node.start_mark.line + 1
    return best


def write_registry(path: Path, clients: list[dict[str, object]]) -> None:
    """Write a registry file (the sandbox CLI and the demo use this)."""
    RegistryFile.model_validate({"clients": clients})  # never write what we would refuse to read
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump({"clients": clients}, sort_keys=False), encoding="utf-8")
    tmp.replace(path)  # whole or not at all: a reader never sees a half-written registry
