"""The client registry: what it accepts, and errors that name the file, line, client and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mc_pipeline.registry import (
    RegistryError,
    SecretError,
    SecretRef,
    YamlClientRegistry,
    parse_partition_key,
    partition_key,
)

GOOD = """\
clients:
  - id: acme
    mailchimp: {api_key: {env: ACME_MC}, base_url: "http://localhost:8080/3.0/"}
    ometria: {api_key: {file: /run/secrets/acme_ometria}}
    lists: [1a2d7ebf82, 0123456789]
  - id: globex-uk
    mailchimp: {api_key: {env: GLOBEX_MC}}
    ometria: {api_key: {env: GLOBEX_OM}}
    lists: all
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clients.yaml"
    path.write_text(text)
    return path


def test_an_unchanged_registry_is_validated_once_and_a_changed_one_again(tmp_path: Path) -> None:
    """Each tick of the schedule and of the sensor reads the file; thousands of clients take
    seconds to validate, so the same text is validated once, and any other text anew."""
    path = write(tmp_path, GOOD)
    first = YamlClientRegistry(path).clients()
    assert [a is b for a, b in zip(first, YamlClientRegistry(path).clients(), strict=True)] == [True, True]
    path.write_text(GOOD.replace("globex-uk", "globex-fr"))  # the same size: only the text tells
    assert [c.id for c in YamlClientRegistry(path).clients()] == ["acme", "globex-fr"]
    path.write_text("clients: [{id: Bad}]\n")
    with pytest.raises(RegistryError):
        YamlClientRegistry(path).clients()


def test_a_good_registry_loads(tmp_path: Path) -> None:
    reg = YamlClientRegistry(write(tmp_path, GOOD))
    acme = reg.client("acme")
    assert acme.lists == ["1a2d7ebf82", "0123456789"]
    assert acme.mailchimp.base_url == "http://localhost:8080/3.0"
    assert acme.collection("1a2d7ebf82") == "mailchimp-1a2d7ebf82"
    assert reg.client("globex-uk").lists == "all"
    with pytest.raises(KeyError, match="initech"):
        reg.client("initech")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("  - id: Acme/..\n", "client 'Acme/..' field id"),
        ("    colour: red\n", "field colour: Extra inputs are not permitted"),
        ("    lists: [http://evil.example/x]\n", "field lists.0"),
        ("    lists: ['../../etc']\n", "field lists.0"),
    ],
)
def test_bad_entries_are_named(tmp_path: Path, entry: str, expected: str) -> None:
    base = [
        "clients:",
        "  - id: acme",
        "    mailchimp: {api_key: {env: ACME_MC}}",
        "    ometria: {api_key: {env: ACME_OM}}",
        "    lists: [1a2d7ebf82]",
    ]
    if entry.startswith("  - id:"):
        base[1] = entry.rstrip("\n")
    elif "lists" in entry:
        base[4] = entry.rstrip("\n")
    else:
        base.append(entry.rstrip("\n"))
    path = write(tmp_path, "\n".join(base) + "\n")
    with pytest.raises(RegistryError) as err:
        YamlClientRegistry(path).clients()
    message = str(err.value)
    assert str(path) in message and expected in message
    assert f"{path}:" in message  # with a line number


def test_a_missing_credential_reference_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "clients:\n  - id: acme\n    mailchimp: {api_key: {}}\n    ometria: {api_key: {env: X}}\n    lists: all\n",
    )
    with pytest.raises(RegistryError, match=r"clients.yaml:3: client 'acme' field mailchimp.api_key"):
        YamlClientRegistry(path).clients()


def test_duplicate_client_ids_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + GOOD.split("\n", 1)[1])
    with pytest.raises(RegistryError, match="'acme' appears more than once"):
        YamlClientRegistry(path).clients()


def test_secrets_resolve_from_env_and_files_and_never_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "s3cr3t-value")
    secret = SecretRef(env="MY_KEY").resolve()
    assert secret.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(secret) and "s3cr3t" not in str(secret)
    (tmp_path / "key").write_text("from-file\n")
    assert SecretRef(file=str(tmp_path / "key")).resolve().get_secret_value() == "from-file"
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(SecretError, match="environment variable MY_KEY is not set"):
        SecretRef(env="MY_KEY").resolve()
    with pytest.raises(SecretError, match="cannot be read"):
        SecretRef(file=str(tmp_path / "missing")).resolve()


def test_partition_keys_round_trip_and_refuse_hostile_values() -> None:
    assert parse_partition_key(partition_key("acme", "1a2d7ebf82")) == ("acme", "1a2d7ebf82")
    for bad in ("acme", "acme:1A2D7EBF82", "../x:1a2d7ebf82", "acme:1a2d7ebf82/..", "acme:http://x", ":"):
        with pytest.raises(ValueError, match="is not '<client_id>:<list_id>'"):
            parse_partition_key(bad)


# --------------------------------------------------------------------------- whole-value patterns
def test_identifiers_with_a_trailing_newline_are_refused(tmp_path: Path) -> None:
    """Issue 9 item 11: `$` also matches before a final newline, so 'acme:1a2d7ebf82\\n' was a key."""
    from mc_pipeline.registry import CLIENT_ID_RE, LIST_ID_RE, MAILCHIMP_KEY_RE
    from mc_pipeline.storage import RUN_ID_RE, PipelineStorage

    for tail in ("\n", "\r\n", " ", "\x00"):
        for bad in (f"acme:1a2d7ebf82{tail}", f"acme{tail}:1a2d7ebf82", f"{tail}acme:1a2d7ebf82"):
            with pytest.raises(ValueError, match="is not '<client_id>:<list_id>'"):
                parse_partition_key(bad)
        for pattern, good in (
            (CLIENT_ID_RE, "acme"),
            (LIST_ID_RE, "1a2d7ebf82"),
            (MAILCHIMP_KEY_RE, "0" * 32 + "-us6"),
            (RUN_ID_RE, "0c2f9a4e-run"),
        ):
            assert pattern.match(good) and pattern.fullmatch(good)
            assert not pattern.match(good + tail) and not pattern.search(good + tail), (pattern.pattern, tail)
        with pytest.raises(ValueError, match="not a safe folder name"):
            PipelineStorage(data_dir=str(tmp_path)).run_folder("acme:1a2d7ebf82", f"run{tail}")
    registry = "\n".join(
        [
            "clients:",
            "  - id: {id}",
            "    mailchimp: {{api_key: {{env: {env}}}, account: {account}}}",
            "    ometria: {{api_key: {{env: ACME_OM}}}}",
            "    lists: [{list}]",
            "    collection_prefix: {prefix}",
        ]
    )
    good = {"id": "acme", "env": "ACME_MC", "account": "acme", "list": "1a2d7ebf82", "prefix": "mailchimp"}
    assert YamlClientRegistry(write(tmp_path, registry.format(**good))).client("acme").lists == ["1a2d7ebf82"]
    for field, value in good.items():
        path = write(tmp_path, registry.format(**{**good, field: f'"{value}\\n"'}))
        with pytest.raises(RegistryError):
            YamlClientRegistry(path).clients()


def test_no_python_pattern_in_the_package_ends_with_a_dollar() -> None:
    r"""The class of item 11: a Python pattern ending in `$` accepts a value plus "\n" under `match`
    and `search`. Compiled patterns end in `\Z` (or are used with `fullmatch`); pydantic's
    `pattern=` keeps `^...$`, since its Rust engine reads `$` as the end of the text."""
    import ast

    import mc_pipeline

    root = Path(mc_pipeline.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert "regex_engine" not in source, f"{path}: pydantic must keep its Rust regex engine"
        for node in ast.walk(ast.parse(source)):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "re"
                and node.func.attr in ("compile", "match", "search")
                and node.args
            ):
                continue
            arg = node.args[0]
            last = arg.values[-1] if isinstance(arg, ast.JoinedStr) and arg.values else arg
            text = last.value if isinstance(last, ast.Constant) and isinstance(last.value, str) else ""
            rel = str(path.relative_to(root))
            if text.endswith("$") and not text.endswith("\\$"):
                found.append(f"{rel}:{node.lineno}: re.{node.func.attr}({text!r})")
    assert not found, "patterns that accept a trailing newline:\n" + "\n".join(found)


# --------------------------------------------------------------------------- empty and removed
@pytest.mark.parametrize("text", ["", "\n  \n", "# the registry\n", "clients: []\n", "removed: []\nclients: []\n"])
def test_a_registry_without_clients_is_refused(tmp_path: Path, text: str) -> None:
    """Issue 9 item 9: an empty file (as while it is rewritten in place) read as 'no clients'."""
    with pytest.raises(RegistryError, match=r"registry is empty|no clients: refused") as err:
        YamlClientRegistry(write(tmp_path, text)).clients()
    assert str(tmp_path / "clients.yaml") in str(err.value)


def test_clients_removed_on_purpose_are_named(tmp_path: Path) -> None:
    reg = YamlClientRegistry(write(tmp_path, "removed: [acme, 'globex-uk:1a2d7ebf82']\nclients: []\n"))
    assert reg.clients() == []
    assert reg.removes("acme:0123456789") and reg.removes("globex-uk:1a2d7ebf82")
    assert not reg.removes("globex-uk:0123456789") and not reg.removes("initech:1a2d7ebf82")
    for removed, expected in (
        ("[acme]", "'acme' is under `removed` but still in `clients`"),
        ('["acme:1a2d7ebf82"]', "'acme:1a2d7ebf82' is under `removed` but still in `clients`"),
        ('["acme:../x"]', "is not '<client_id>:<list_id>'"),
        ('["acme\\n"]', "is not '<client_id>:<list_id>'"),  # YAML's "\n": a newline
    ):
        with pytest.raises(RegistryError, match=expected):
            YamlClientRegistry(write(tmp_path, f"removed: {removed}\n" + GOOD)).clients()
    assert not YamlClientRegistry(write(tmp_path, "removed: ['acme:ffffffffff']\n" + GOOD)).removes("acme:1a2d7ebf82")


def test_write_registry_replaces_the_file_whole(tmp_path: Path) -> None:
    """Our own writer (sandbox CLI, demo) never leaves a half-written registry for the sensor."""
    from mc_pipeline.registry import write_registry

    path = write(tmp_path, GOOD)
    inode = path.stat().st_ino
    entry = {"id": "acme", "mailchimp": {"api_key": {"env": "A"}}, "ometria": {"api_key": {"env": "B"}}, "lists": "all"}
    write_registry(path, [entry])
    assert path.stat().st_ino != inode  # a rename, not a rewrite in place
    assert [c.id for c in YamlClientRegistry(path).clients()] == ["acme"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clients.yaml"]
    with pytest.raises(ValueError, match="no clients"):
        write_registry(path, [])


def _one_client(tmp_path: Path, mailchimp: str, ometria: str = "{api_key: {env: OM}}") -> Path:
    return write(
        tmp_path, f"clients:\n  - id: acme\n    mailchimp: {mailchimp}\n    ometria: {ometria}\n    lists: all\n"
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/", "must be https"),
        ("https://169.254.169.254/latest", "169.254.169.254 is a link-local (cloud metadata) address"),
        ("https://[fd00:ec2::254]/", "is a private or non-public address"),
        ("https://10.1.2.3/3.0", "10.1.2.3 is a private or non-public address"),
        ("https://192.168.0.10/3.0", "is a private or non-public address"),
        ("https://[::ffff:169.254.169.254]/", "link-local"),
        ("https://metadata.google.internal/", "internal or metadata name"),
        ("https://mailchimp-proxy/3.0", "internal or metadata name"),
        ("http://us6.api.mailchimp.com/3.0", "must be https"),
        ("https://user:pw@us6.api.mailchimp.com/3.0", "must not carry credentials"),
        ("https://us6.api.mailchimp.com/3.0?apikey=x", "must not have a query"),
        ("https://us6.api.mailchimp.com/3.0\n", "printable ASCII"),
        ("ftp://us6.api.mailchimp.com/", "http(s) URL"),
    ],
)
def test_base_urls_must_be_https_and_public(tmp_path: Path, url: str, reason: str) -> None:
    path = _one_client(tmp_path, f"{{api_key: {{env: MC}}, base_url: {json.dumps(url)}}}")  # YAML reads JSON escapes
    with pytest.raises(RegistryError, match="client 'acme' field mailchimp") as caught:
        YamlClientRegistry(path).clients()
    assert reason in str(caught.value) and "base_url" in str(caught.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/3.0", "http://127.3.4.5/3.0", "http://[::1]:8080/v2", "http://localhost:1/v2"]
)
def test_plain_http_only_to_loopback(tmp_path: Path, url: str) -> None:
    client = YamlClientRegistry(
        _one_client(tmp_path, "{api_key: {env: MC}}", f"{{api_key: {{env: OM}}, base_url: {url!r}}}")
    )
    assert client.client("acme").ometria.base_url == url


def test_a_private_base_url_needs_allow_private_network(tmp_path: Path) -> None:
    for url in ("https://10.1.2.3/3.0", "http://10.1.2.3/3.0", "http://sandbox:8080/3.0"):  # e.g. a compose sandbox
        entry = f"{{api_key: {{env: MC}}, base_url: '{url}', allow_private_network: true}}"
        assert YamlClientRegistry(_one_client(tmp_path, entry)).client("acme").mailchimp.base_url == url
    public = "{api_key: {env: MC}, base_url: 'http://8.8.8.8/3.0', allow_private_network: true}"
    with pytest.raises(RegistryError, match=r"8\.8\.8\.8 is a public address: plain http"):  # never in clear
        YamlClientRegistry(_one_client(tmp_path, public)).clients()
