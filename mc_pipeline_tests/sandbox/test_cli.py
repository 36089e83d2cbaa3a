"""`mc-pipeline sandbox` as a real subprocess: flags, --config YAML, the registry and env files it writes."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from mc_pipeline.cli import build_parser
from mc_pipeline.registry import YamlClientRegistry
from mc_pipeline.sandbox import Sandbox, SandboxConfig
from mc_pipeline.sandbox.config import config_from_args as _sandbox_config

START_TIMEOUT_S = 30.0


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], workdir: Path) -> Running:
    port = free_port()
    log = workdir / f"sandbox-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mc_pipeline.cli", "sandbox", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = Running(proc, port, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sandbox exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if requests.get(f"{running.base_url}/_sandbox/health", timeout=1).json() == {"status": "ok"}:
                return running
        except requests.exceptions.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop(running)
            pytest.fail(f"sandbox not healthy after {START_TIMEOUT_S}s:\n{log.read_text()}")
        time.sleep(0.05)


def stop(running: Running) -> None:
    """End the subprocess we started, by its own handle."""
    if running.proc.poll() is None:
        running.proc.terminate()
        try:
            running.proc.wait(10)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait(10)


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line.strip())


# ------------------------------------------------------------------------------------------ flags
@pytest.fixture(scope="module")
def flags(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Path, Path]]:
    workdir = tmp_path_factory.mktemp("cli-flags")
    registry, env = workdir / "registry.yaml", workdir / "sandbox.env"
    running = start(["--members", "50,80", "--write-registry", str(registry), "--write-env", str(env)], workdir)
    yield running, registry, env
    stop(running)
    assert running.proc.returncode is not None


def test_starts_and_serves_the_configured_lists(flags: tuple[Running, Path, Path]) -> None:
    running, _, _ = flags
    config = requests.get(f"{running.base_url}/_sandbox/config", timeout=5).json()
    assert config["seed"] == 42
    [client] = config["clients"]
    assert client["client_id"] == "client-1"
    assert [x["members"] for x in client["lists"]] == [50, 80]
    assert "sandbox on http://127.0.0.1:" in running.log.read_text()


def test_registry_validates_and_points_at_the_sandbox(flags: tuple[Running, Path, Path]) -> None:
    running, registry, _ = flags
    [client] = YamlClientRegistry(registry).clients()
    assert client.id == "client-1"
    assert client.mailchimp.base_url == f"{running.base_url}/3.0"
    assert client.ometria.base_url == f"{running.base_url}/v2"
    served = requests.get(f"{running.base_url}/_sandbox/config", timeout=5).json()["clients"][0]["lists"]
    assert client.lists == [x["id"] for x in served]
    # The registry names the keys' variables; it holds no key.
    text = registry.read_text()
    assert client.mailchimp.api_key.env == "MC_SANDBOX_CLIENT_1_MAILCHIMP_KEY"
    assert client.ometria.api_key.env == "MC_SANDBOX_CLIENT_1_OMETRIA_KEY"
    assert not any(value in text for value in read_env(flags[2]).values())


def test_env_file_keys_authenticate(flags: tuple[Running, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    running, registry, env = flags
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    values = read_env(env)
    assert set(values) == {"MC_SANDBOX_CLIENT_1_MAILCHIMP_KEY", "MC_SANDBOX_CLIENT_1_OMETRIA_KEY"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    [client] = YamlClientRegistry(registry).clients()
    mc_key = client.mailchimp.api_key.resolve().get_secret_value()
    om_key = client.ometria.api_key.resolve().get_secret_value()

    lists = requests.get(f"{client.mailchimp.base_url}/lists", auth=("x", mc_key), timeout=5)
    assert lists.status_code == 200
    assert [x["id"] for x in lists.json()["lists"]] == client.lists
    wrong = requests.get(f"{client.mailchimp.base_url}/lists", auth=("x", mc_key[:-4] + "us99"), timeout=5)
    assert wrong.status_code == 401

    record = {"@type": "contact", "@collection": "mailchimp-cli", "id": "cli-1", "email": "cli@example.org"}
    pushed = requests.post(
        f"{client.ometria.base_url}/push", json=[record], headers={"X-Ometria-Auth": om_key}, timeout=5
    )
    assert pushed.status_code == 202 and pushed.json()["accepted"] == 1
    stored = requests.get(f"{running.base_url}/_sandbox/ometria/accounts/client-1/contacts", timeout=5).json()
    assert stored["contacts"]["mailchimp-cli"]["cli-1"]["email"] == "cli@example.org"
    assert requests.post(f"{client.ometria.base_url}/push", json=[record], timeout=5).status_code == 401


def test_subprocess_serves_what_an_in_process_sandbox_serves(flags: tuple[Running, Path, Path]) -> None:
    """Same seed, same members, byte for byte, across processes."""
    running, _, env = flags
    key = read_env(env)["MC_SANDBOX_CLIENT_1_MAILCHIMP_KEY"]
    with Sandbox(SandboxConfig.generated(members=[50, 80])) as local:
        assert local.client("client-1").mailchimp_key == key
        for list_id in local.client("client-1").list_ids:
            path = f"/3.0/lists/{list_id}/members?count=1000"
            remote = requests.get(f"{running.base_url}{path}", auth=("x", key), timeout=5)
            here = requests.get(f"{local.base_url}{path}", auth=("x", key), timeout=5)
            assert remote.status_code == here.status_code == 200
            assert remote.content == here.content


# ------------------------------------------------------------------------------------------ --config
YAML_CONFIG = {
    "seed": 7,
    "mailchimp": {"latency": {"base_ms": 60}, "max_in_flight": 4},
    "ometria": {"rate_per_second": 3},
    "accounts": [
        {
            "client_id": "acme",
            "mailchimp_key": "0123456789abcdef0123456789abcdef-us19",
            "ometria_key": "acme-ometria-key-0001",
            "dc": "us19",
            "lists": [{"id": "abcdef0123", "name": "Acme main", "members": 25}, {"members": 10}],
        },
        {"client_id": "globex", "lists": [{"members": 5}]},
    ],
}


@pytest.fixture(scope="module")
def from_yaml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Path]]:
    workdir = tmp_path_factory.mktemp("cli-yaml")
    config_path = workdir / "sandbox.yaml"
    config_path.write_text(yaml.safe_dump(YAML_CONFIG), encoding="utf-8")
    registry = workdir / "registry.yaml"
    running = start(["--config", str(config_path), "--write-registry", str(registry)], workdir)
    yield running, registry
    stop(running)


def test_config_file_accounts_and_lists(from_yaml: tuple[Running, Path], tmp_path: Path) -> None:
    running, registry = from_yaml
    config = requests.get(f"{running.base_url}/_sandbox/config", timeout=5).json()
    assert config["seed"] == 7
    assert [c["client_id"] for c in config["clients"]] == ["acme", "globex"]
    acme = config["clients"][0]
    assert acme["dc"] == "us19"
    assert (acme["lists"][0]["id"], acme["lists"][0]["members"]) == ("abcdef0123", 25)
    assert acme["lists"][1]["members"] == 10
    # Ids and keys not in the file derive from its seed, exactly as in-process.
    path = tmp_path / "same.yaml"
    path.write_text(yaml.safe_dump(YAML_CONFIG), encoding="utf-8")
    expected = SandboxConfig.from_yaml(path)
    assert [x["id"] for x in acme["lists"]] == [spec.id for spec in expected.accounts[0].lists]
    assert [c.id for c in YamlClientRegistry(registry).clients()] == ["acme", "globex"]


def test_config_file_key_latency_and_limits(from_yaml: tuple[Running, Path]) -> None:
    running, _ = from_yaml
    key = YAML_CONFIG["accounts"][0]["mailchimp_key"]  # type: ignore[index]
    started = time.perf_counter()
    r = requests.get(f"{running.base_url}/3.0/lists/abcdef0123", auth=("x", key), timeout=5)
    assert r.status_code == 200
    assert r.json()["name"] == "Acme main"
    assert time.perf_counter() - started >= 0.06 * 0.95
    record = {"@type": "contact", "id": "y", "email": "y@example.org"}
    headers = {"X-Ometria-Auth": "acme-ometria-key-0001"}
    codes = [
        requests.post(f"{running.base_url}/v2/push", json=[record], headers=headers, timeout=5).status_code
        for _ in range(4)
    ]
    assert codes == [202, 202, 202, 429]


def test_seed_flag_derives_keys_and_ids(tmp_path: Path) -> None:
    """--seed goes in before the keys and list ids are derived (regression: they kept seed 42's)."""
    parse = build_parser().parse_args
    generated = _sandbox_config(parse(["sandbox", "--seed", "7", "--members", "10"]))
    assert generated.seed == 7
    assert generated.accounts == SandboxConfig.generated(seed=7, members=10).accounts
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(YAML_CONFIG), encoding="utf-8")
    reseeded = _sandbox_config(parse(["sandbox", "--config", str(path), "--seed", "9"]))
    expected = SandboxConfig.model_validate({**YAML_CONFIG, "seed": 9})
    assert reseeded.seed == 9
    assert reseeded.accounts == expected.accounts
    assert reseeded.accounts[0].mailchimp_key == YAML_CONFIG["accounts"][0]["mailchimp_key"]  # type: ignore[index]
    assert reseeded.accounts[1].mailchimp_key != SandboxConfig.from_yaml(path).accounts[1].mailchimp_key
