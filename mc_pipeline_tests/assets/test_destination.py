"""A watermark belongs to a destination: a new collection, account, key or URL starts with a full sync
(issue 9, item 7)."""

from __future__ import annotations

import os

import pytest
import yaml
from dagster import DagsterInstance

from mc_pipeline.assets.watermarks import DESTINATION, destination_of, latest_watermarks
from mc_pipeline.local import LocalEnvironment, patched_environ
from mc_pipeline.registry import Client, YamlClientRegistry, write_registry
from mc_pipeline.resources.limits import fingerprint
from mc_pipeline.sandbox import Sandbox
from mc_pipeline.storage import PipelineStorage
from mc_pipeline_tests.helpers import assert_ometria_matches, metadata, sync


def edit_client(env: LocalEnvironment, client_id: str, **changes: object) -> Client:
    clients = yaml.safe_load(env.registry.read_text(encoding="utf-8"))["clients"]
    for c in clients:
        if c["id"] == client_id:
            for path, value in changes.items():
                *parents, leaf = path.split("__")
                target = c
                for p in parents:
                    target = target[p]
                target[leaf] = value
    write_registry(env.registry, clients)
    return YamlClientRegistry(env.registry).client(client_id)


@pytest.fixture
def synced(small_env: LocalEnvironment, instance: DagsterInstance) -> tuple[Sandbox, str, str]:
    """The first list of client-1, synced once into its default collection."""
    list_id = small_env.sandbox.client("client-1").list_ids[0]
    partition = f"client-1:{list_id}"
    assert sync(instance, partition).success
    return small_env.sandbox, list_id, partition


def test_a_new_collection_prefix_starts_with_a_full_sync_into_the_new_collection(
    small_env: LocalEnvironment, instance: DagsterInstance, synced: tuple[Sandbox, str, str]
) -> None:
    sb, list_id, partition = synced
    assert sync(instance, partition).success  # incremental: the destination has not changed
    client = edit_client(small_env, "client-1", collection_prefix="brand2")

    moved = sync(instance, partition)  # what the hourly schedule runs: no full_refresh asked for
    pages = metadata(moved, "mailchimp/member_pages")
    assert pages["full_refresh"] is True and "window_since" not in pages and pages["window"] == "full sync"
    contacts = metadata(moved, "ometria/contacts")
    assert contacts["collection"] == f"brand2-{list_id}" and contacts[DESTINATION]["collection"] == f"brand2-{list_id}"
    assert contacts["deleted_in_mailchimp_opted_out"] == 0  # nothing of the old collection is judged here
    assert_ometria_matches(sb, partition, collection_prefix="brand2")
    why = [e.user_message for e in instance.all_logs(moved.run_id) if "destination changed" in (e.user_message or "")]
    assert why and "mailchimp-" in why[0]  # the log says why, naming the old collection
    # The known contacts are the new destination's own; the next run is incremental again.
    storage = PipelineStorage(data_dir=str(small_env.data_dir))
    known = storage.known_contacts(partition, destination_of(client, list_id).id)
    assert storage.known_contacts(partition).folder == known.folder  # the current one, for the dead letters
    assert known.read().num_rows == len(sb.ometria_contacts("client-1", f"brand2-{list_id}"))
    again = sync(instance, partition)
    assert metadata(again, "mailchimp/member_pages")["full_refresh"] is False


def test_every_part_of_a_destination_moves_its_watermark_and_the_key_is_never_recorded(
    small_env: LocalEnvironment, instance: DagsterInstance, synced: tuple[Sandbox, str, str]
) -> None:
    sb, list_id, partition = synced
    client = YamlClientRegistry(small_env.registry).client("client-1")
    before = destination_of(client, list_id)
    assert latest_watermarks(instance, partition, before).since is not None
    key_var = client.ometria.api_key.env or ""
    key = os.environ[key_var]
    recorded = metadata(sync(instance, partition), "ometria/contacts")[DESTINATION]
    assert recorded["key"] == fingerprint(key) and key not in str(recorded)

    changed = [destination_of(edit_client(small_env, "client-1", ometria__account="shared-om"), list_id)]
    moved = edit_client(small_env, "client-1", ometria__account=None, ometria__base_url="http://127.0.0.1:9/v2")
    changed.append(destination_of(moved, list_id))
    with patched_environ({key_var: key + "-rotated"}):
        changed.append(destination_of(client, list_id))
    assert len({d.id for d in changed} | {before.id}) == 4
    for other in changed:
        marks = latest_watermarks(instance, partition, other)
        assert marks.since is None and "destination changed" in (marks.why_full or "")
    same = edit_client(small_env, "client-1", ometria__base_url=sb.ometria_url + "/")  # the same URL
    assert destination_of(same, list_id) == before
