"""The run launchers beyond one machine, checked without Docker or Kubernetes.

docker-compose.run-launcher.yml + deploy/dagster.docker-launcher.yaml (DockerRunLauncher) and
deploy/helm/values.yaml (the official chart's K8sRunLauncher) must keep dagster.yaml's storage,
queue and account limits, give every run what a run in user_code has (database, registry, keys,
data volume, compute-log folder), and pass Dagster's own config schemas.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
from dagster._core.utils import parse_env_var
from dagster._utils.tags import TagConcurrencyLimitsCounter

from mc_pipeline import tags
from mc_pipeline.registry import YamlClientRegistry
from mc_pipeline_tests.deploy.test_deployment import (
    DEPLOY,
    DEPLOY_MOUNT,
    IMAGE_SERVICES,
    ROOT,
    _run,
    dagster_yaml,
    dockerfile_env,
    env_file_vars,
    environment,
    host_path,
    interpolate,
    mounts,
    pg_env,  # noqa: F401  (fixture)
    service_env_files,
)

DOCKER_INSTANCE = DEPLOY / "dagster.docker-launcher.yaml"
OVERRIDE = ROOT / "docker-compose.run-launcher.yml"
HELM_VALUES = DEPLOY / "helm" / "values.yaml"
HELM_CLIENTS = DEPLOY / "helm" / "clients.example.yaml"
# Added to dagster.yaml by another change, maybe not yet merged: allowed here either way.
PARTITION_LIMIT = {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
LAUNCHED_BY = ("user_code", "webserver", "daemon")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def docker_instance() -> dict[str, Any]:
    return load(DOCKER_INSTANCE)


def limit_set(limits: list[dict[str, Any]]) -> set[str]:
    return {yaml.safe_dump(x, sort_keys=True) for x in limits}


def expected_limits() -> set[str]:
    """dagster.yaml's tag limits, plus one run at a time per `dagster/partition` value."""
    return limit_set(dagster_yaml()["run_coordinator"]["config"]["tag_concurrency_limits"]) | limit_set(
        [PARTITION_LIMIT]
    )


# --------------------------------------------------------------------------- compose, merged as compose does
_REQUIRED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?([^}]*)\}")


def interpolate_required(value: Any, env: dict[str, str]) -> Any:
    """`${NAME:?message}` (compose fails when NAME is unset or empty), then the rest as test_deployment does."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if not env.get(m.group(1)):
                raise ValueError(m.group(2))
            return env[m.group(1)]

        return interpolate(_REQUIRED.sub(sub, value), env)
    if isinstance(value, dict):
        return {k: interpolate_required(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_required(v, env) for v in value]
    return value


def _merge_service(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge: mappings deep-merged, `volumes` by container path, other sequences appended."""
    out = dict(base)
    for key, value in over.items():
        if key not in out:
            out[key] = value
        elif key == "volumes":
            by_target = {spec.split(":")[1]: spec for spec in out[key]}
            by_target.update({spec.split(":")[1]: spec for spec in value})
            out[key] = list(by_target.values())
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _merge_service(out[key], value)
        elif isinstance(value, list) and isinstance(out[key], list):
            out[key] = out[key] + [v for v in value if v not in out[key]]
        else:
            out[key] = value
    return out


def merged_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {"DOCKER_GID": "998"} if env is None else env
    base = interpolate_required(load(ROOT / "docker-compose.yml"), env)
    over = interpolate_required(load(OVERRIDE), env)
    services = dict(base["services"])
    for name, service in over["services"].items():
        assert name in services, f"the override adds a service: {name}"
        services[name] = _merge_service(services[name], service)
    return {**base, **{k: v for k, v in over.items() if k != "services"}, "services": services}


def provided_env(service: dict[str, Any]) -> dict[str, str]:
    """A container's variables set by compose: the env_file(s), then `environment` over them."""
    env: dict[str, str] = {}
    for f in service_env_files(service):
        env.update(env_file_vars(f))
    env.update(environment(service))
    return env


def launcher_config() -> dict[str, Any]:
    return docker_instance()["run_launcher"]["config"]


# --------------------------------------------------------------------------- the Docker variant
def test_docker_instance_is_dagster_yaml_but_the_launcher():
    """One instance file per deployment is all Dagster reads: the copy must not drift from dagster.yaml."""
    mine, main = docker_instance(), dagster_yaml()
    assert set(mine) == set(main)
    for section in set(main) - {"run_launcher", "run_coordinator"}:
        assert mine[section] == main[section], section
    coordinator, main_coordinator = mine["run_coordinator"], main["run_coordinator"]
    assert {k: v for k, v in coordinator.items() if k != "config"} == {
        k: v for k, v in main_coordinator.items() if k != "config"
    }
    rest = {k: v for k, v in coordinator["config"].items() if k != "tag_concurrency_limits"}
    assert rest == {k: v for k, v in main_coordinator["config"].items() if k != "tag_concurrency_limits"}
    assert limit_set(coordinator["config"]["tag_concurrency_limits"]) == expected_limits()
    assert (mine["run_launcher"]["module"], mine["run_launcher"]["class"]) == ("dagster_docker", "DockerRunLauncher")


def _home_with(tmp_path: Path, instance_file: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(instance_file, home / "dagster.yaml")
    return home


def test_docker_instance_passes_dagsters_schema(tmp_path):
    from dagster_docker import DockerRunLauncher

    config, custom_class = dagster_instance_config(str(_home_with(tmp_path, DOCKER_INSTANCE)))
    assert custom_class is None
    processed = process_config(DockerRunLauncher.config_type(), config["run_launcher"]["config"])
    assert processed.success, processed.errors
    # The constructor's own checks (e.g. no `environment`/`network` in container_kwargs).
    launcher = DockerRunLauncher.from_config_value(None, processed.value)  # type: ignore[arg-type]
    assert launcher.networks == ["mc-pipeline"]
    assert launcher.supports_check_run_worker_health


@pytest.mark.postgres
def test_docker_instance_on_postgresql_launches_runs_with_user_codes_environment(pg_env, tmp_path, monkeypatch):  # noqa: F811
    """Dagster's DockerContainerContext for a run, resolved in the daemon's environment as the launcher does."""
    from dagster_docker import DockerRunLauncher
    from dagster_docker.container_context import DockerContainerContext

    home = _home_with(tmp_path, DOCKER_INSTANCE)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = DagsterInstance.from_config(str(home))
    try:
        launcher = instance.run_launcher
        assert isinstance(launcher, DockerRunLauncher)
        queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None and limit_set(list(queue.tag_concurrency_limits)) == expected_limits()
        run = DagsterRun(job_name="sync", run_id=str(uuid.uuid4()))
        context = DockerContainerContext.create_for_run(run, launcher)
    finally:
        instance.dispose()

    services = merged_compose()["services"]
    daemon_env = provided_env(services["daemon"])
    for name in list(os.environ):
        if name.startswith(("DAGSTER_PG_", "MC_")):
            monkeypatch.delenv(name)
    for k, v in daemon_env.items():
        monkeypatch.setenv(k, v)
    run_env = dict(parse_env_var(v) for v in context.env_vars)
    user_code_env = provided_env(services["user_code"])
    assert {k: run_env.get(k) for k in user_code_env} == user_code_env, "a run container lacks user_code's settings"
    assert context.container_kwargs["volumes_from"] == [services["user_code"]["container_name"]]


def test_override_builds_one_image_with_the_docker_extra_that_the_launcher_starts():
    services = merged_compose()["services"]
    images = {services[n]["image"] for n in IMAGE_SERVICES}
    assert images == {launcher_config()["image"]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = pyproject["project"]["optional-dependencies"]
    for n in IMAGE_SERVICES:
        extra = services[n]["build"]["args"]["MC_PIPELINE_EXTRAS"]
        assert extra == "docker" and extras[extra] == ["dagster-docker==0.29.27"]
    # The same Dagster family as the base dependencies, and the Dockerfile uses the argument.
    assert "dagster-postgres==0.29.27" in pyproject["project"]["dependencies"]
    assert "dagster-docker==0.29.27" in extras["dev"]
    assert extras["k8s"] == ["dagster-k8s==0.29.27"]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "ARG MC_PIPELINE_EXTRAS" in dockerfile and '".[$MC_PIPELINE_EXTRAS]"' in dockerfile


def test_override_gives_every_dagster_service_the_docker_instance_file():
    services = merged_compose()["services"]
    target = f"{dockerfile_env()['DAGSTER_HOME']}/dagster.yaml"
    for name in LAUNCHED_BY:
        source, mode = mounts(services[name])[target]
        assert (ROOT / source).resolve() == DOCKER_INSTANCE and mode == "ro", name
        # ... and keeps what docker-compose.yml gave it.
        assert set(mounts(load(ROOT / "docker-compose.yml")["services"][name])) <= set(mounts(services[name]))


def test_only_the_launching_services_reach_the_docker_api():
    services = merged_compose()["services"]
    sock = "/var/run/docker.sock"
    for name in ("daemon", "webserver"):
        assert mounts(services[name])[sock] == (sock, "rw")
        assert services[name]["group_add"] == ["998"]
    for name in ("user_code", "sandbox", "postgres"):
        assert sock not in mounts(services[name])
    with pytest.raises(ValueError, match="DOCKER_GID"):
        merged_compose({})


def test_run_containers_join_the_compose_network_and_share_user_codes_volumes():
    compose = merged_compose()
    assert compose["networks"]["default"]["name"] == launcher_config()["network"]
    user_code = compose["services"]["user_code"]
    assert launcher_config()["container_kwargs"]["volumes_from"] == [user_code["container_name"]]
    m = mounts(user_code)
    # The data volume: every run writes its list's run folders and the known-contacts store there.
    data_dir = environment(user_code)["MC_PIPELINE_DATA_DIR"]
    assert m[data_dir][0] == "data" and m[data_dir][1] == "rw"
    base_dir = PurePosixPath(dagster_yaml()["compute_logs"]["config"]["base_dir"])
    assert any(PurePosixPath(t) in base_dir.parents and src == "dagster_logs" for t, (src, _) in m.items())
    # The registry the runs read is the file user_code reads.
    run_env = dict(v.split("=", 1) for v in launcher_config()["env_vars"] if "=" in v)
    assert run_env["MC_PIPELINE_CLIENTS"] == environment(user_code)["MC_PIPELINE_CLIENTS"]
    assert host_path(user_code, run_env["MC_PIPELINE_CLIENTS"]).is_file()
    assert m[DEPLOY_MOUNT] == ("./deploy", "ro")


def test_run_containers_get_every_key_the_registry_names():
    registry = YamlClientRegistry(DEPLOY / "clients.sandbox.yaml")
    names = {v.split("=", 1)[0] for v in launcher_config()["env_vars"]}
    for client in registry.clients():
        for ref in (client.mailchimp.api_key, client.ometria.api_key):
            assert ref.env in names, ref.env
    # Keys travel by name (their values come from the daemon), never written in the instance file.
    keys = set(env_file_vars(DEPLOY / "sandbox.env"))
    assert not [v for v in launcher_config()["env_vars"] if "=" in v and v.split("=", 1)[0] in keys]
    assert not [v for v in launcher_config()["env_vars"] if v.startswith("DAGSTER_PG_PASSWORD=")]


# --------------------------------------------------------------------------- the Helm chart
def helm_values() -> dict[str, Any]:
    return load(HELM_VALUES)


def user_deployment() -> dict[str, Any]:
    (deployment,) = helm_values()["dagster-user-deployments"]["deployments"]
    return deployment


def pvcs() -> dict[str, dict[str, Any]]:
    return {
        m["metadata"]["name"]: m
        for m in helm_values().get("extraManifests") or []
        if m["kind"] == "PersistentVolumeClaim"
    }


def volume_sources(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod.get("volumes") or []}


def mount_at(pod: dict[str, Any], path: str) -> dict[str, Any]:
    (hit,) = [m for m in pod.get("volumeMounts") or [] if m["mountPath"] == path]
    return hit


def test_helm_queue_limits_are_dagster_yamls():
    queued = helm_values()["dagsterDaemon"]["runCoordinator"]
    assert queued["enabled"] and queued["type"] == "QueuedRunCoordinator"
    config = queued["config"]["queuedRunCoordinator"]
    assert config["maxConcurrentRuns"] == dagster_yaml()["run_coordinator"]["config"]["max_concurrent_runs"]
    assert limit_set(config["tagConcurrencyLimits"]) == expected_limits()


def test_helm_monitoring_and_retries_are_dagster_yamls():
    values = helm_values()
    extra = values["additionalInstanceConfig"]
    assert extra["run_monitoring"] == dagster_yaml()["run_monitoring"]
    assert extra["run_retries"] == dagster_yaml()["run_retries"]
    # The chart would render these keys a second time, without max_runtime_seconds and
    # retry_on_asset_or_op_failure: its own rendering is off.
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] is False
    assert values["dagsterDaemon"]["runRetries"]["enabled"] is False
    assert values["telemetry"] == dagster_yaml()["telemetry"]


def test_helm_user_code_deployment_runs_this_image_and_its_config_goes_to_the_run_pods():
    d = user_deployment()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert d["codeServerArgs"] == ["-m", pyproject["tool"]["dagster"]["module_name"]]
    assert d["includeConfigInLaunchedRuns"] == {"enabled": True}
    assert helm_values()["runLauncher"]["type"] == "K8sRunLauncher"
    assert "image" not in helm_values()["runLauncher"]["config"]["k8sRunLauncher"], "runs use the code's image"
    # The image's user (Dockerfile useradd --uid) owns what it writes on the shared volume.
    uid = re.search(r"useradd [^&]*--uid (\d+)", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    assert uid and d["podSecurityContext"]["fsGroup"] == d["podSecurityContext"]["runAsUser"] == int(uid.group(1))


def test_helm_data_directory_is_a_read_write_many_claim_shared_by_the_code_runs_and_webserver():
    d = user_deployment()
    env = {e["name"]: e.get("value") for e in d["env"]}
    data = mount_at(d, env["MC_PIPELINE_DATA_DIR"])
    claim = volume_sources(d)[data["name"]]["persistentVolumeClaim"]["claimName"]
    assert pvcs()[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    # Compute logs: written by the run pods (the deployment's mounts), read by the webserver.
    logs_dir = str(PurePosixPath(dagster_yaml()["compute_logs"]["config"]["base_dir"]).parent)
    custom = helm_values()["computeLogManager"]
    assert custom["type"] == "CustomComputeLogManager"
    assert custom["config"]["customComputeLogManager"] == {
        k: dagster_yaml()["compute_logs"][k] for k in ("module", "class", "config")
    }
    web = helm_values()["dagsterWebserver"]
    for pod in (d, web):
        logs = mount_at(pod, logs_dir)
        assert volume_sources(pod)[logs["name"]]["persistentVolumeClaim"]["claimName"] == claim
        assert logs["subPath"] == "logs" != data["subPath"]


def test_helm_secrets_are_kubernetes_secrets_mounted_as_the_files_the_registry_names():
    d = user_deployment()
    env = {e["name"]: e for e in d["env"]}
    clients_path = PurePosixPath(env["MC_PIPELINE_CLIENTS"]["value"])
    clients_mount = mount_at(d, str(clients_path.parent))
    assert "configMap" in volume_sources(d)[clients_mount["name"]] and clients_mount["readOnly"]
    registry = YamlClientRegistry(HELM_CLIENTS)
    refs = [ref for c in registry.clients() for ref in (c.mailchimp.api_key, c.ometria.api_key)]
    assert refs and all(ref.file for ref in refs)
    for ref in refs:
        keys = mount_at(d, str(PurePosixPath(ref.file).parent))
        assert "secret" in volume_sources(d)[keys["name"]] and keys["readOnly"]
    assert "secretKeyRef" in env["MC_PIPELINE_ALERT_WEBHOOK"]["valueFrom"]
    # No secret value in the file: the database password comes from a Secret made outside the chart.
    values = helm_values()
    assert values["generatePostgresqlPasswordSecret"] is False and "postgresqlPassword" not in values["postgresql"]
    assert values["postgresql"]["postgresqlScheme"] == dagster_yaml()["storage"]["postgres"]["postgres_db"]["scheme"]


def chart_instance(values: dict[str, Any]) -> dict[str, Any]:
    """The dagster.yaml the chart renders from these values (templates/configmap-instance.yaml and
    helpers/instance/*.tpl of helm/dagster), for the sections these values set. No helm here: the
    templates are followed by hand; namespace and service account are what a release named
    mc-pipeline in namespace mc-pipeline would get."""
    pg = values["postgresql"]
    pg_config = {
        "postgres_db": {
            "username": pg["postgresqlUsername"],
            "password": {"env": "DAGSTER_PG_PASSWORD"},
            "hostname": pg["postgresqlHost"],
            "db_name": pg["postgresqlDatabase"],
            "port": pg["service"]["port"],
            "params": {},
            "scheme": pg["postgresqlScheme"],
        }
    }
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    custom_logs = values["computeLogManager"]["config"]["customComputeLogManager"]
    return {
        "scheduler": {"module": "dagster._core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            "config": pg_config,
        },
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": pg_config},
        "event_log_storage": {
            "module": "dagster_postgres.event_log",
            "class": "PostgresEventLogStorage",
            "config": pg_config,
        },
        "run_launcher": {
            "module": "dagster_k8s",
            "class": "K8sRunLauncher",
            "config": {
                "load_incluster_config": k8s["loadInclusterConfig"],
                "job_namespace": "mc-pipeline",
                "image_pull_policy": k8s["imagePullPolicy"],
                "service_account_name": "mc-pipeline-dagster",
                "dagster_home": {"env": "DAGSTER_HOME"},
                "instance_config_map": {"env": "DAGSTER_K8S_INSTANCE_CONFIG_MAP"},
                "postgres_password_secret": {"env": "DAGSTER_K8S_PG_PASSWORD_SECRET"},
                "env_config_maps": [{"env": "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP"}],
                "run_k8s_config": {"job_spec_config": {"ttl_seconds_after_finished": 3600}},
            },
        },
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                "max_concurrent_runs": queued["maxConcurrentRuns"],
                "tag_concurrency_limits": queued["tagConcurrencyLimits"],
            },
        },
        "compute_logs": custom_logs,
        "telemetry": values["telemetry"],
        **values["additionalInstanceConfig"],
    }


def test_helm_rendered_instance_passes_dagsters_schema(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(chart_instance(helm_values())), encoding="utf-8")
    config, custom_class = dagster_instance_config(str(home))
    assert custom_class is None
    coordinator = QueuedRunCoordinator.from_config_value(None, config["run_coordinator"]["config"])  # type: ignore[arg-type]
    queue = coordinator.get_run_queue_config()
    assert queue.max_concurrent_runs == 8 and limit_set(list(queue.tag_concurrency_limits)) == expected_limits()
    logs = process_config(LocalComputeLogManager.config_type(), config["compute_logs"]["config"])
    assert logs.success, logs.errors
    # The queue blocks a second run of the same list, and of the same account, from any pod.
    running = [_run("acme", "aaaaaaaaaa")]
    counter = TagConcurrencyLimitsCounter(list(queue.tag_concurrency_limits), running)
    assert counter.is_blocked(_run("acme", "bbbbbbbbbb")) and not counter.is_blocked(_run("globex", "cccccccccc"))
    assert tags.MAILCHIMP_ACCOUNT in {x["key"] for x in queue.tag_concurrency_limits}


def test_helm_k8s_launcher_and_run_pod_config_pass_dagster_k8s_schemas(monkeypatch):
    """Needs the `k8s` extra (not in `dev`: kubernetes, google-auth, cryptography)."""
    dagster_k8s = pytest.importorskip("dagster_k8s")
    from dagster_k8s.container_context import K8sContainerContext

    # What the chart sets in the daemon's and the webserver's environment (their Deployments).
    for name, value in {
        "DAGSTER_HOME": "/opt/dagster/dagster_home",
        "DAGSTER_K8S_INSTANCE_CONFIG_MAP": "mc-pipeline-dagster-instance",
        "DAGSTER_K8S_PG_PASSWORD_SECRET": helm_values()["global"]["postgresqlSecretName"],
        "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP": "mc-pipeline-dagster-pipeline-env",
    }.items():
        monkeypatch.setenv(name, value)

    config = chart_instance(helm_values())["run_launcher"]["config"]
    processed = process_config(dagster_k8s.K8sRunLauncher.config_type(), config)
    assert processed.success, processed.errors
    # What includeConfigInLaunchedRuns hands the launcher for each run pod: the deployment's env,
    # volumes and mounts as the chart writes them (DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT).
    d = user_deployment()
    context = K8sContainerContext.create_from_config(
        {"k8s": {"env": d["env"], "volumes": d["volumes"], "volume_mounts": d["volumeMounts"]}}
    )
    pod = context.run_k8s_config.pod_spec_config
    container = context.run_k8s_config.container_config
    assert {v["name"] for v in pod["volumes"]} == {"data", "clients", "keys"}
    claim = next(v for v in pod["volumes"] if v["name"] == "data")["persistent_volume_claim"]["claim_name"]
    assert pvcs()[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert {m["mount_path"] for m in container["volume_mounts"]} == {m["mountPath"] for m in d["volumeMounts"]}
    assert {e["name"] for e in container["env"]} == {
        "MC_PIPELINE_CLIENTS",
        "MC_PIPELINE_DATA_DIR",
        "MC_PIPELINE_ALERT_WEBHOOK",
    }
