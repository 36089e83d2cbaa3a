# One image for every service of docker-compose.yml: the Dagster webserver and daemon, the
# user_code gRPC server (which also runs the sensors, schedules and runs), and the sandbox.
# Layout follows Dagster's examples/deploy_docker, with the project installed as a package.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The project and its pinned Dagster family (dagster, dagster-webserver, dagster-postgres).
# Only what the package needs is copied (see .dockerignore): tests and local data stay out.
# MC_PIPELINE_EXTRAS adds an optional extra of pyproject.toml, e.g. `docker` (DockerRunLauncher,
# docker-compose.run-launcher.yml) or `k8s` (K8sRunLauncher, deploy/helm/values.yaml).
ARG MC_PIPELINE_EXTRAS=""
WORKDIR /opt/mc_pipeline/src
COPY pyproject.toml README.md ./
COPY mc_pipeline/ mc_pipeline/
RUN pip install . \
    && if [ -n "$MC_PIPELINE_EXTRAS" ]; then pip install ".[$MC_PIPELINE_EXTRAS]"; fi \
    && rm -rf /opt/mc_pipeline/src

# A non-root user. The folders that compose mounts named volumes on are created here, owned by
# that user, so the fresh volumes inherit the ownership: /data (MC_PIPELINE_DATA_DIR: pages,
# Parquet staging per run) and /opt/dagster/logs (compute logs, see dagster.yaml).
RUN groupadd --system --gid 10001 dagster \
    && useradd --system --uid 10001 --gid dagster --home-dir /opt/dagster --no-create-home \
       --shell /usr/sbin/nologin dagster \
    && mkdir -p /opt/dagster/dagster_home /opt/dagster/logs/compute /data /opt/mc_pipeline/deploy \
    && chown -R dagster:dagster /opt/dagster /data

# The instance (deploy/dagster.yaml: kept out of the repository root, where Dagster's CLI would
# read it for local work) and the workspace. DAGSTER_HOME is writable by the user (Dagster keeps small
# local state there); the two YAML files are root-owned, read-only configuration.
ENV DAGSTER_HOME=/opt/dagster/dagster_home
COPY deploy/dagster.yaml workspace.yaml /opt/dagster/dagster_home/

USER dagster
WORKDIR /opt/dagster/dagster_home

# 3000: dagster-webserver, 4000: user_code gRPC server, 8080: the sandbox.
EXPOSE 3000 4000 8080

# Each compose service sets its own command; alone, the image validates the definitions.
CMD ["dagster", "definitions", "validate", "-m", "mc_pipeline.definitions"]
