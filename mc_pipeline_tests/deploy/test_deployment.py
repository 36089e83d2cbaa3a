"""The docker compose deployment, checked without Docker: the YAML files load and agree with each other.

docker-compose.yml, deploy/dagster.yaml, workspace.yaml, the Dockerfile and deploy/ must name the same
services, ports, paths, variables, clients, lists and keys; dagster.yaml must pass Dagster's own
validation and give a working instance on PostgreSQL; the definitions must load.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance
from dagster._core.instance.config import dagster_instance_config
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.scheduler import DagsterDaemonScheduler
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
from dagster._utils.tags import TagConcurrencyLimitsCounter

from mc_pipeline import tags
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import MAILCHIMP_KEY_RE, YamlClientRegistry, partition_key
from mc_pipeline.sandbox.config import SandboxConfig
from mc_pipeline.sandbox.registry import key_env_names, key_environment, registry_entries
from mc_pipeline_tests.conftest import PG

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DAGSTER_SERVICES = ("user_code", "webserver", "daemon")
IMAGE_SERVICES = ("sandbox", *DAGSTER_SERVICES)
DEPLOY_MOUNT = "/opt/mc_pipeline/deploy"


# --------------------------------------------------------------------------- helpers
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's `${NAME:-default}` / `${NAME}` / `$$`, against `env` (default: nothing set)."""
    env = env or {}
    if isinstance(value, str):
        return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def load_compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8")))


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(x) for x in cmd]


def option(cmd: list[str], *names: str) -> str:
    for i, arg in enumerate(cmd[:-1]):
        if arg in names:
            return cmd[i + 1]
    raise AssertionError(f"none of {names} in {cmd}")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def env_file_vars(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path.name}: not NAME=value: {raw!r}"
        out[name.strip()] = value.strip()
    return out


def service_env_files(service: dict[str, Any]) -> list[Path]:
    files = service.get("env_file") or []
    files = [files] if isinstance(files, str) else files
    return [ROOT / (f if isinstance(f, str) else f["path"]) for f in files]


def provided_vars(service: dict[str, Any]) -> set[str]:
    """Variables a container of this service has: compose environment, env_file(s), the image's ENV."""
    names = set(environment(service)) | dockerfile_env().keys()
    for f in service_env_files(service):
        names |= env_file_vars(f).keys()
    return names


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) of the short-syntax volumes."""
    out = {}
    for spec in service.get("volumes") or []:
        parts = spec.split(":")
        source, target = parts[0], parts[1]
        out[target] = (source, parts[2] if len(parts) > 2 else "rw")
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """The repository file a container path of a bind mount shows."""
    p = PurePosixPath(container_path)
    for target, (source, _) in mounts(service).items():
        if source.startswith(".") and (p == PurePosixPath(target) or PurePosixPath(target) in p.parents):
            return ROOT / source / p.relative_to(target)
    raise AssertionError(f"{container_path} is under no bind mount of the service")


def env_refs(node: Any) -> set[str]:
    """Every `{env: NAME}` in a Dagster YAML tree."""
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            return {node["env"]}
        return set().union(*(env_refs(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(env_refs(v) for v in node)) if node else set()
    return set()


def dagster_yaml() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "dagster.yaml").read_text(encoding="utf-8"))


def dockerfile_lines() -> list[str]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile_lines():
        if line.upper().startswith("ENV "):
            for token in shlex.split(line[4:]):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def compose_env_for_dagster() -> dict[str, str]:
    """What dagster.yaml reads, as the daemon container gets it (all three agree, tested below)."""
    return environment(load_compose()["services"]["daemon"])


# --------------------------------------------------------------------------- docker-compose.yml
def test_compose_has_the_five_services_and_declares_its_named_volumes():
    compose = load_compose()
    assert set(compose["services"]) == {"postgres", "sandbox", "user_code", "webserver", "daemon"}
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for _target, (source, _) in mounts(service).items():
            if not source.startswith((".", "/")):
                assert source in named, f"{name} mounts undeclared volume {source}"


EXPECTED_COMMANDS = {
    "sandbox": "mc-pipeline sandbox --host 0.0.0.0 --port 8080 --config /opt/mc_pipeline/deploy/sandbox.yaml",
    "user_code": "dagster code-server start -h 0.0.0.0 -p 4000 -m mc_pipeline.definitions",
    "webserver": "dagster-webserver -h 0.0.0.0 -p 3000 -w /opt/dagster/dagster_home/workspace.yaml",
    "daemon": "dagster-daemon run -w /opt/dagster/dagster_home/workspace.yaml",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_COMMANDS))
def test_compose_commands(name):
    assert command(load_compose()["services"][name]) == shlex.split(EXPECTED_COMMANDS[name])


def test_compose_image_services_share_one_image_built_from_the_dockerfile():
    services = load_compose()["services"]
    images = {services[n]["image"] for n in IMAGE_SERVICES}
    assert len(images) == 1
    for n in IMAGE_SERVICES:
        build = services[n]["build"]
        assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == ROOT / "Dockerfile"


def test_compose_postgres_service():
    pg = load_compose()["services"]["postgres"]
    assert pg["image"] == "postgres:15"
    env = environment(pg)
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= env.keys()
    assert all(env[k] for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"))
    test = pg["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "pg_isready" in test[1]
    assert mounts(pg)["/var/lib/postgresql/data"][0] == "pgdata"
    assert "ports" not in pg, "the database stays on the compose network"


def test_compose_published_ports():
    services = load_compose()["services"]
    assert services["webserver"]["ports"] == ["3000:3000"]
    assert services["sandbox"]["ports"] == ["8080:8080"]
    assert option(command(services["sandbox"]), "--port") == "8080"
    assert "ports" not in services["user_code"], "the gRPC server is reached only by the other services"


def test_compose_depends_on_conditions():
    services = load_compose()["services"]
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "user_code": {"condition": "service_started"},
        }
    assert services["user_code"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["daemon"]["restart"] == "on-failure"


def test_every_variable_dagster_yaml_reads_reaches_every_dagster_service():
    refs = env_refs(dagster_yaml())
    assert {"DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"} <= refs
    services = load_compose()["services"]
    for name in DAGSTER_SERVICES:
        missing = refs - provided_vars(services[name])
        assert not missing, f"{name} lacks {sorted(missing)}"
    # ... with one value everywhere (the YAML anchor), pointing at the postgres service.
    values = {name: {k: environment(services[name])[k] for k in refs} for name in DAGSTER_SERVICES}
    assert values["user_code"] == values["webserver"] == values["daemon"]
    pg_env = environment(services["postgres"])
    v = values["daemon"]
    assert v["DAGSTER_PG_HOST"] == "postgres" and v["DAGSTER_PG_PORT"] == "5432"
    assert (v["DAGSTER_PG_USER"], v["DAGSTER_PG_PASSWORD"], v["DAGSTER_PG_DB"]) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        pg_env["POSTGRES_DB"],
    )


def test_compose_interpolation_overrides_both_sides_of_the_password():
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    composed = interpolate(raw, {"DAGSTER_PG_PASSWORD": "s3cret"})
    assert composed["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"
    for name in DAGSTER_SERVICES:
        assert composed["services"][name]["environment"]["DAGSTER_PG_PASSWORD"] == "s3cret"


def test_user_code_has_the_registry_the_keys_and_the_data_volume():
    services = load_compose()["services"]
    uc = services["user_code"]
    env = environment(uc)
    assert env["MC_PIPELINE_CLIENTS"] == f"{DEPLOY_MOUNT}/clients.sandbox.yaml"
    assert env["MC_PIPELINE_DATA_DIR"] == "/data"
    m = mounts(uc)
    assert m["/data"][0] == "data"
    assert m[DEPLOY_MOUNT] == ("./deploy", "ro")
    assert host_path(uc, env["MC_PIPELINE_CLIENTS"]) == DEPLOY / "clients.sandbox.yaml"
    assert service_env_files(uc) == [DEPLOY / "sandbox.env"]
    registry = YamlClientRegistry(DEPLOY / "clients.sandbox.yaml")
    for client in registry.clients():
        for ref in (client.mailchimp.api_key, client.ometria.api_key):
            assert ref.env in provided_vars(uc), f"user_code lacks {ref.env}"


def test_sandbox_service_reads_the_repositorys_sandbox_yaml():
    sb = load_compose()["services"]["sandbox"]
    assert mounts(sb)[DEPLOY_MOUNT] == ("./deploy", "ro")
    assert host_path(sb, option(command(sb), "--config")) == DEPLOY / "sandbox.yaml"


def test_only_user_code_holds_keys_and_data():
    """DefaultRunLauncher: runs, sensors and schedules execute in user_code; the others need only the DB."""
    services = load_compose()["services"]
    key_names = set(env_file_vars(DEPLOY / "sandbox.env"))
    for name in ("webserver", "daemon"):
        s = services[name]
        assert not service_env_files(s)
        assert not key_names & provided_vars(s)
        assert "MC_PIPELINE_CLIENTS" not in environment(s)
        assert "/data" not in mounts(s) and DEPLOY_MOUNT not in mounts(s)


def test_compute_logs_live_on_a_volume_shared_by_the_runs_and_the_webserver():
    base_dir = PurePosixPath(dagster_yaml()["compute_logs"]["config"]["base_dir"])
    services = load_compose()["services"]
    volumes = []
    for name in ("user_code", "webserver"):
        hits = [
            (src, mode)
            for target, (src, mode) in mounts(services[name]).items()
            if base_dir == PurePosixPath(target) or PurePosixPath(target) in base_dir.parents
        ]
        assert hits, f"{name} does not mount {base_dir}"
        volumes.append(hits[0][0])
        assert hits[0][1] == "rw"
    assert volumes[0] == volumes[1]


# --------------------------------------------------------------------------- workspace.yaml
def test_workspace_points_at_the_user_code_service():
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text(encoding="utf-8"))
    (entry,) = workspace["load_from"]
    grpc = entry["grpc_server"]
    services = load_compose()["services"]
    assert grpc["host"] in services and grpc["host"] == "user_code"
    assert str(grpc["port"]) == option(command(services["user_code"]), "-p", "--port")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert grpc["location_name"] == pyproject["tool"]["dagster"]["code_location_name"] == "mc_pipeline"
    # The webserver and the daemon read the copy the image puts in DAGSTER_HOME.
    home = dockerfile_env()["DAGSTER_HOME"]
    for name in ("webserver", "daemon"):
        assert option(command(services[name]), "-w", "--workspace") == f"{home}/workspace.yaml"


# --------------------------------------------------------------------------- dagster.yaml
@pytest.fixture
def dagster_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    return home


def test_dagster_yaml_passes_dagsters_validation(dagster_home, monkeypatch):
    for k, v in compose_env_for_dagster().items():
        monkeypatch.setenv(k, v)
    config, custom_class = dagster_instance_config(str(dagster_home), config_filename="dagster.yaml")
    assert custom_class is None
    assert config["storage"]["postgres"]["postgres_db"]["hostname"] == {"env": "DAGSTER_PG_HOST"}
    assert config["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert config["scheduler"]["class"] == "DagsterDaemonScheduler"
    assert config["run_launcher"]["class"] == "DefaultRunLauncher"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["run_monitoring"]["enabled"] is True
    assert config["run_monitoring"]["max_resume_run_attempts"] == 0, "DefaultRunLauncher cannot resume runs"
    assert config["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False}
    assert config["compute_logs"]["class"] == "LocalComputeLogManager"
    assert config["telemetry"] == {"enabled": False}
    # Dagster validates the coordinator's own config only when it builds it: do that too.
    coordinator = QueuedRunCoordinator.from_config_value(None, config["run_coordinator"]["config"])  # type: ignore[arg-type]
    assert coordinator.get_run_queue_config().max_concurrent_runs == 8


def test_dagster_yaml_limits_one_run_per_partition_and_per_account():
    limits = dagster_yaml()["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert sorted(limits, key=lambda x: x["key"]) == [
        {"key": key, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} for key in sorted(tags.LIMITED_TAGS)
    ]


def _run(client_id: str, list_id: str, **account: str) -> DagsterRun:
    from mc_pipeline.registry import Client

    client = Client.model_validate(
        {
            "id": client_id,
            "mailchimp": {"api_key": {"env": "X"}, "account": account.get("mailchimp")},
            "ometria": {"api_key": {"env": "X"}, "account": account.get("ometria")},
            "lists": [list_id],
        }
    )
    return DagsterRun(job_name="sync", run_id=str(uuid.uuid4()), tags=tags.run_tags(client, "incremental"))


def test_the_queue_holds_back_a_second_run_of_the_same_account_only():
    """Dagster's own tag counter, fed the limits of dagster.yaml and the tags the pipeline puts on runs."""
    limits = dagster_yaml()["run_coordinator"]["config"]["tag_concurrency_limits"]
    running = [_run("acme", "aaaaaaaaaa")]
    counter = TagConcurrencyLimitsCounter(limits, running)
    assert counter.is_blocked(_run("acme", "bbbbbbbbbb")), "same client: same two accounts"
    assert not counter.is_blocked(_run("globex", "cccccccccc"))
    # Two clients sharing one Ometria account (registry `account:`) wait for each other too.
    shared = [_run("acme", "aaaaaaaaaa", ometria="acme-ometria")]
    counter = TagConcurrencyLimitsCounter(limits, shared)
    assert counter.is_blocked(_run("acme-outlet", "dddddddddd", ometria="acme-ometria"))
    assert not counter.is_blocked(_run("acme-outlet", "dddddddddd", ometria="outlet-ometria"))


# --------------------------------------------------------------------------- a real instance on PostgreSQL
@pytest.fixture
def pg_env(pg_database: str, monkeypatch) -> Iterator[str]:
    """The DAGSTER_PG_* variables of the compose file, pointed at a fresh local database."""
    values = {
        "DAGSTER_PG_HOST": PG["host"],
        "DAGSTER_PG_PORT": str(PG["port"]),
        "DAGSTER_PG_USER": PG["user"],
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_PG_DB": pg_database,
    }
    assert set(values) == env_refs(dagster_yaml()) & set(compose_env_for_dagster())
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    yield pg_database


def test_instance_from_the_repositorys_dagster_yaml_on_postgresql(pg_env, dagster_home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"

        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None and queue.max_concurrent_runs == 8
        assert {
            (x["key"], x["limit"], x["value"]["applyLimitPerUniqueValue"]) for x in queue.tag_concurrency_limits
        } == {(key, 1, True) for key in tags.LIMITED_TAGS}
        assert queue.max_user_code_failure_retries == 3

        assert isinstance(instance.run_launcher, DefaultRunLauncher)
        assert isinstance(instance.scheduler, DagsterDaemonScheduler)
        assert isinstance(instance.compute_log_manager, LocalComputeLogManager)
        assert not instance.telemetry_enabled

        assert instance.run_retries_enabled
        assert instance.run_retries_max_retries == 2
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_resume_run_attempts == 0
        assert instance.run_monitoring_start_timeout_seconds == 180
        assert instance.run_monitoring_max_runtime_seconds == 6 * 3600
        assert instance.run_monitoring_poll_interval_seconds == 60

        keys = [partition_key("acme", "f709dca9d1"), partition_key("globex", "ccfaaea0f0")]
        instance.add_dynamic_partitions(MAILCHIMP_LISTS, keys)
        assert sorted(instance.get_dynamic_partitions(MAILCHIMP_LISTS)) == sorted(keys)
        assert instance.has_dynamic_partition(MAILCHIMP_LISTS, keys[0])
    finally:
        instance.dispose()

    # ... and a second instance (another service) sees them: they are in PostgreSQL, not in the process.
    other = DagsterInstance.from_config(str(dagster_home))
    try:
        assert sorted(other.get_dynamic_partitions(MAILCHIMP_LISTS)) == sorted(keys)
    finally:
        other.dispose()


# --------------------------------------------------------------------------- deploy/
def test_sandbox_yaml_has_three_clients_of_two_lists_with_explicit_keys_and_ids():
    raw = yaml.safe_load((DEPLOY / "sandbox.yaml").read_text(encoding="utf-8"))
    config = SandboxConfig.from_yaml(DEPLOY / "sandbox.yaml")
    assert len(config.accounts) == 3
    for acc_raw, acc in zip(raw["accounts"], config.accounts, strict=True):
        assert acc_raw["mailchimp_key"] == acc.mailchimp_key and MAILCHIMP_KEY_RE.match(acc.mailchimp_key)
        assert acc_raw["ometria_key"] == acc.ometria_key
        assert len(acc.lists) == 2
        for spec_raw, spec in zip(acc_raw["lists"], acc.lists, strict=True):
            assert spec_raw["id"] == spec.id and re.fullmatch(r"[0-9a-f]{10}", spec.id)
            assert 1000 <= spec.members <= 10_000
    keys = [a.mailchimp_key for a in config.accounts] + [a.ometria_key for a in config.accounts]
    assert len(set(keys)) == len(keys)
    assert config.mailchimp.latency.base_ms >= 100 and config.mailchimp.latency.per_kb_ms > 0
    assert config.ometria.latency.base_ms > 0


def test_sandbox_registry_matches_the_sandbox_and_the_compose_network():
    config = SandboxConfig.from_yaml(DEPLOY / "sandbox.yaml")
    registry = YamlClientRegistry(DEPLOY / "clients.sandbox.yaml")
    clients = registry.clients()
    assert [c.id for c in clients] == [a.client_id for a in config.accounts]
    for client, acc in zip(clients, config.accounts, strict=True):
        assert client.lists == [spec.id for spec in acc.lists]
        mc_env, om_env = key_env_names(acc.client_id)
        assert (client.mailchimp.api_key.env, client.ometria.api_key.env) == (mc_env, om_env)
    # Exactly what `mc-pipeline sandbox --write-registry` would write for the compose service's URL.
    sandbox = load_compose()["services"]["sandbox"]
    base = f"http://sandbox:{option(command(sandbox), '--port')}"
    written = yaml.safe_load((DEPLOY / "clients.sandbox.yaml").read_text(encoding="utf-8"))["clients"]
    assert written == registry_entries(config, base)


def test_sandbox_env_holds_the_sandbox_keys_under_the_names_the_registry_uses():
    config = SandboxConfig.from_yaml(DEPLOY / "sandbox.yaml")
    env = env_file_vars(DEPLOY / "sandbox.env")
    referenced = {
        ref.env
        for c in YamlClientRegistry(DEPLOY / "clients.sandbox.yaml").clients()
        for ref in (c.mailchimp.api_key, c.ometria.api_key)
    }
    assert set(env) == referenced
    assert env == key_environment(config)
    assert "sandbox-only" in (DEPLOY / "sandbox.env").read_text(encoding="utf-8").lower()


def test_sandbox_registry_resolves_with_the_env_file(monkeypatch):
    for k, v in env_file_vars(DEPLOY / "sandbox.env").items():
        monkeypatch.setenv(k, v)
    config = SandboxConfig.from_yaml(DEPLOY / "sandbox.yaml")
    for client, acc in zip(YamlClientRegistry(DEPLOY / "clients.sandbox.yaml").clients(), config.accounts, strict=True):
        assert client.mailchimp.api_key.resolve().get_secret_value() == acc.mailchimp_key
        assert client.ometria.api_key.resolve().get_secret_value() == acc.ometria_key


def test_example_registry_for_real_accounts():
    clients = YamlClientRegistry(DEPLOY / "clients.example.yaml").clients()
    assert clients
    refs = [ref for c in clients for ref in (c.mailchimp.api_key, c.ometria.api_key)]
    assert any(ref.file for ref in refs)
    assert all(ref.env or ref.file.startswith("/run/secrets/") for ref in refs)
    assert all(c.mailchimp.base_url is None and c.ometria.base_url is None for c in clients)


# --------------------------------------------------------------------------- Dockerfile
def test_dockerfile_installs_the_project_and_sets_dagster_home():
    lines = dockerfile_lines()
    assert lines[0] == "FROM python:3.11-slim"
    copies = " ".join(ln for ln in lines if ln.startswith("COPY "))
    for needed in ("pyproject.toml", "README.md", "mc_pipeline/", "deploy/dagster.yaml", "workspace.yaml"):
        assert needed in copies
    assert any(re.search(r"\bpip install \.(\s|$)", ln) for ln in lines)
    env = dockerfile_env()
    home = env["DAGSTER_HOME"]
    assert home == "/opt/dagster/dagster_home"
    assert any(ln.startswith("COPY ") and "deploy/dagster.yaml workspace.yaml" in ln and home in ln for ln in lines)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    exposed = {p for ln in lines if ln.startswith("EXPOSE ") for p in ln.split()[1:]}
    assert exposed == {"3000", "4000", "8080"}


def test_dockerfile_creates_the_volume_mount_points_for_its_user():
    """Fresh named volumes copy the image folder's owner: without these, the non-root user cannot write."""
    run = " ".join(ln for ln in dockerfile_lines() if ln.startswith("RUN "))
    services = load_compose()["services"]
    for name in ("user_code", "webserver"):
        for target, (source, _) in mounts(services[name]).items():
            if not source.startswith((".", "/")):
                assert target in run, f"the image does not create {target}"


def _ignored(pattern_lines: list[str], path: str) -> bool:
    import fnmatch

    ignored = False
    for pat in pattern_lines:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[0], pat):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_out_the_venv_tests_caches_and_data_but_not_what_the_image_needs():
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for path in (".venv", "mc_pipeline_tests", ".pytest_cache", ".ruff_cache", ".dagster_home", ".mc_pipeline_data"):
        assert _ignored(patterns, path), path
    for path in ("pyproject.toml", "README.md", "mc_pipeline/definitions.py", "deploy/dagster.yaml", "workspace.yaml"):
        assert not _ignored(patterns, path), path


# --------------------------------------------------------------------------- the definitions
def test_dagster_definitions_validate(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "MC_PIPELINE_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "mc_pipeline.definitions"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
