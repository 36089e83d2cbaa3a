"""The client registry as a Dagster resource (path from MC_PIPELINE_CLIENTS via EnvVar)."""

from __future__ import annotations

from functools import cached_property

from dagster import ConfigurableResource, Failure
from pydantic import Field

from mc_pipeline.registry import (
    Client,
    Credentials,
    RegistryError,
    SecretError,
    YamlClientRegistry,
    parse_partition_key,
)
from mc_pipeline.resources.errors import CredentialError


class ClientRegistryResource(ConfigurableResource):
    path: str = Field(description="the client registry YAML (MC_PIPELINE_CLIENTS)")

    @cached_property
    def registry(self) -> YamlClientRegistry:
        return YamlClientRegistry(self.path)

    def client_for_partition(self, partition_key: str) -> tuple[Client, str]:
        """The client and list id of a partition, or a Failure that says what is wrong."""
        try:
            client_id, list_id = parse_partition_key(partition_key)
            client = self.registry.client(client_id)
        except (ValueError, KeyError, RegistryError) as exc:
            raise Failure(description=f"partition {partition_key}: {exc}") from None
        if client.lists != "all" and list_id not in client.lists:
            raise Failure(
                description=f"partition {partition_key}: list {list_id} is not among the lists of client {client_id!r} "
                f"in the registry {self.path}; remove the partition or add the list"
            )
        return client, list_id

    def credentials(self, client: Client, list_id: str) -> Credentials:
        """Both accounts' keys, resolved before the first request of a run: a missing variable, an
        unreadable file or a malformed key fails the run at once (not after the whole fetch), as a
        CredentialError (not retryable) naming the client, the list, the field and the reference."""
        try:
            return client.credentials()
        except SecretError as exc:
            raise CredentialError(f"{exc.field}: {exc.cause}", client_id=client.id, list_id=list_id) from None
