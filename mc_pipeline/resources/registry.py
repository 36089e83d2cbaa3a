"""The client registry as a Dagster resource (path from MC_PIPELINE_CLIENTS via EnvVar)."""

from __future__ import annotations

from functools import cached_property

from dagster import ConfigurableResource, Failure
from pydantic import Field, PrivateAttr

from mc_pipeline.registry import Client, ClientRegistry, RegistryError, YamlClientRegistry, parse_partition_key


class ClientRegistryResource(ConfigurableResource):
    path: str = Field(description="the client registry YAML (MC_PIPELINE_CLIENTS)")
    _registry: ClientRegistry | None = PrivateAttr(None)

    @cached_property
    def registry(self) -> ClientRegistry:
        return YamlClientRegistry(self.path)

    def client_for_partition(self, partition_key: str) -> tuple[Client, str]:
        """The client and list id of a partition, or a Failure that says what is wrong."""
        try:
            client_id, list_id = parse_partition_key(partition_key)
            client = self.registry.client(client_id)
        except (ValueError, KeyError, RegistryError) as exc:
            raise Failure(description=f"partition {partition_key}: {exc}", allow_retries=False) from None
        if client.lists != "all" and list_id not in client.lists:
            raise Failure(
                description=f"partition {partition_key}: list {list_id} is not among the lists of client {client_id!r} "
                f"in the registry {self.path}; remove the partition or add the list",
                allow_retries=False,
            )
        return client, list_id
