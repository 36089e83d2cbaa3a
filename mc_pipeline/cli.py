"""`mc-pipeline`: the sandbox, the demo, partition management and dead letters."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the imports stay lazy for start-up speed
    from dagster import DagsterInstance

    from mc_pipeline.automation.sensors import Desired
    from mc_pipeline.registry import Client
    from mc_pipeline.storage import PipelineStorage


def cmd_sandbox(args: argparse.Namespace) -> int:
    from mc_pipeline.sandbox import serve_forever
    from mc_pipeline.sandbox.config import config_from_args
    from mc_pipeline.sandbox.registry import write_pipeline_files

    config = config_from_args(args)
    port = config.port or 8080
    config = config.model_copy(update={"port": port})
    public = args.public_url or f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '') else config.host}:{port}"
    if args.write_registry:
        write_pipeline_files(
            config, public, Path(args.write_registry), Path(args.write_env) if args.write_env else None
        )
        print(f"registry written to {args.write_registry}" + (f", keys to {args.write_env}" if args.write_env else ""))
    keys = [f"{acc.client_id}:{spec.id}" for acc in config.accounts for spec in acc.lists]
    print(f"partition keys (<client id>:<list id>): {_few(keys, 10)}", flush=True)
    total = sum(spec.members for acc in config.accounts for spec in acc.lists)
    print(f"generating {len(keys)} lists, {total:,} members ...", flush=True)

    def listening() -> None:  # called once the port accepts connections, not before
        print(
            f"sandbox on {public}: Mailchimp {public}/3.0, Ometria {public}/v2, admin {public}/_sandbox "
            f"({len(config.accounts)} clients, {len(keys)} lists, {total} members); Ctrl-C stops it",
            flush=True,
        )

    serve_forever(config, on_listening=listening)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """A project-local Dagster instance with production's run queue and limits (one run per list and account)."""
    home = Path(args.home).resolve()
    print(_ensure_instance_file(home))
    print(f"export DAGSTER_HOME={home}")
    return 0


def _ensure_instance_file(home: Path) -> str:
    """Write `home/dagster.yaml` (mc_pipeline.local's local instance) unless one is there; say what was done."""
    from mc_pipeline.local import local_instance_yaml

    path = home / "dagster.yaml"
    if path.exists():
        same = path.read_text(encoding="utf-8") == local_instance_yaml()
        return f"{path}: " + ("up to date" if same else "kept as it is (not written by mc-pipeline init)")
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(local_instance_yaml(), encoding="utf-8")
    return f"{path}: written (SQLite; the run queue allows one run per list and per account, as in production)"


def cmd_demo(args: argparse.Namespace) -> int:
    from mc_pipeline.demo import main as demo_main

    return demo_main(args)


def _instance() -> DagsterInstance:
    from dagster import DagsterInstance

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise SystemExit(
            "DAGSTER_HOME is not set: partitions live in a Dagster instance; "
            "`mc-pipeline init` makes one in .dagster_home and prints the export line"
        )
    if not (Path(home) / "dagster.yaml").exists():  # first use: the same limits as `mc-pipeline init`
        print(_ensure_instance_file(Path(home)), file=sys.stderr)
    return DagsterInstance.get()


def cmd_partitions(args: argparse.Namespace) -> int:
    from mc_pipeline.partitions import MAILCHIMP_LISTS
    from mc_pipeline.registry import parse_partition_key

    if args.action == "list" and args.registry:
        return _list_registry_keys()
    instance = _instance()
    if args.action == "list":
        for key in instance.get_dynamic_partitions(MAILCHIMP_LISTS):
            print(key)
        return 0
    for key in args.keys:
        try:
            parse_partition_key(key)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    registry = os.environ.get("MC_PIPELINE_CLIENTS")
    if args.action == "add":
        if not registry:
            print(
                "warning: MC_PIPELINE_CLIENTS is not set, so the keys were checked for shape only; "
                "the registry sensor removes partitions its registry does not list",
                file=sys.stderr,
            )
        else:
            problems = _not_in_registry(Path(registry), args.keys)
            if problems:
                why = [*dict.fromkeys(problems.values()), _KEY_HINT.format(registry=registry)]  # a refused file: once
                print("error: " + "\n  ".join(why), file=sys.stderr)
                return 2
        new = [k for k in args.keys if not instance.has_dynamic_partition(MAILCHIMP_LISTS, k)]
        instance.add_dynamic_partitions(MAILCHIMP_LISTS, new)
        print(
            f"added {len(new)} partitions"
            + (f" ({len(args.keys) - len(new)} existed)" if len(new) < len(args.keys) else "")
        )
    else:
        for key in args.keys:
            instance.delete_dynamic_partition(MAILCHIMP_LISTS, key)
        print(f"removed {len(args.keys)} partitions")
        listed = sorted(set(args.keys) - set(_not_in_registry(Path(registry), args.keys))) if registry else []
        if listed:
            print(f"note: the registry still lists {listed}; the sensor adds them back unless they leave it")
    return 0


_KEY_HINT = (
    "a key is '<client id>:<list id>': a client of {registry} and one of its lists (a Mailchimp list id); "
    "to sync a new list, add it to the registry: the sensor then adds its partition with a full sync"
)


def _list_registry_keys() -> int:
    """The partition keys the registry in MC_PIPELINE_CLIENTS gives (what the sensor adds), one a line."""
    registry = os.environ.get("MC_PIPELINE_CLIENTS")
    if not registry:
        print("error: MC_PIPELINE_CLIENTS is not set (the client registry)", file=sys.stderr)
        return 2
    from mc_pipeline.registry import RegistryError, YamlClientRegistry

    try:
        clients = YamlClientRegistry(registry).clients()
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if all(c.lists != "all" for c in clients):  # named lists: no Mailchimp call, no Dagster import
        keys, errors = [f"{c.id}:{list_id}" for c in clients for list_id in c.lists], []
    else:
        desired = _desired(clients)
        keys, errors = list(desired.keys), desired.errors
    for key in keys:  # the registry's order: its first list first
        print(key)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


def _desired(clients: list[Client]) -> Desired:  # resolved as the sensor resolves them
    import time

    from mc_pipeline.automation.sensors import SensorCursor, desired_partitions
    from mc_pipeline.resources import MailchimpResource

    return desired_partitions(clients, SensorCursor(), MailchimpResource(), time.time())


def _not_in_registry(path: Path, keys: list[str]) -> dict[str, str]:
    """Why each key is not a list of the registry (none when all are): the sensor would delete it.

    `lists: all` clients are resolved as the sensor resolves them, by asking Mailchimp.
    """
    from mc_pipeline.registry import RegistryError, YamlClientRegistry, parse_partition_key

    try:
        clients = YamlClientRegistry(path).clients()
    except RegistryError as exc:
        return dict.fromkeys(keys, str(exc))
    named = {parse_partition_key(k)[0] for k in keys}
    desired = _desired([c for c in clients if c.id in named])
    problems = {}
    for key in keys:
        client_id, list_id = parse_partition_key(key)
        if key in desired.keys:
            continue
        mine = sorted(k for k in desired.keys if k.startswith(f"{client_id}:"))
        if client_id not in {c.id for c in clients}:
            why = f"client {client_id!r} is not in the registry (its clients: {_few(sorted(c.id for c in clients))})"
        elif client_id in desired.unknown_clients:
            why = f"client {client_id!r} has `lists: all` and its lists could not be read: {'; '.join(desired.errors)}"
        else:
            why = f"list {list_id} is not a list of client {client_id!r} in the registry (its keys: {_few(mine)})"
        problems[key] = f"partition {key}: {why}"
    return problems


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "") if items else "none"


def _partition_problem(partition: str, registry: str | None, storage: PipelineStorage) -> tuple[int, str] | None:
    """Why a partition has no dead letters to show: (exit code, message), or None when it has a history.

    Unknown (not in the registry, not a partition of the Dagster instance) is an error; never
    synced is an answer, not "no dead letters"."""
    from mc_pipeline.registry import RegistryError, YamlClientRegistry, parse_partition_key

    try:
        client_id, list_id = parse_partition_key(partition)
        if registry:
            client = YamlClientRegistry(str(registry)).client(client_id)
            if client.lists != "all" and list_id not in client.lists:
                return (
                    2,
                    f"error: {partition}: unknown: list {list_id} is not a list of client {client_id!r} in {registry}",
                )
    except (ValueError, KeyError, RegistryError) as exc:
        return 2, f"error: {partition}: unknown: {str(exc).strip(chr(34))}"
    if os.environ.get("DAGSTER_HOME"):
        from dagster import AssetRecordsFilter

        from mc_pipeline.assets.keys import CONTACTS_KEY
        from mc_pipeline.partitions import MAILCHIMP_LISTS

        with _instance() as instance:
            if not instance.has_dynamic_partition(MAILCHIMP_LISTS, partition):
                return (
                    2,
                    f"error: {partition}: unknown: not a partition of {MAILCHIMP_LISTS} (see `partitions list`)",
                )
            where = AssetRecordsFilter(asset_key=CONTACTS_KEY, asset_partitions=[partition])
            if not instance.fetch_materializations(where, limit=1).records:
                return 0, f"{partition}: never synced (no import recorded), so no dead letters yet"
    elif not storage.partition_dir(partition).is_dir():
        return 0, f"{partition}: never synced (nothing under {storage.root}), so no dead letters yet"
    return None


def cmd_dead_letters(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    from mc_pipeline import dead_letters
    from mc_pipeline.resources import OmetriaResource
    from mc_pipeline.resources.errors import ApiError
    from mc_pipeline.storage import PipelineStorage

    storage = PipelineStorage()
    registry = os.environ.get("MC_PIPELINE_CLIENTS")
    if args.action == "replay" and not registry:
        print("error: MC_PIPELINE_CLIENTS is not set (the client registry)", file=sys.stderr)
        return 2
    problem = _partition_problem(args.partition, registry, storage)
    if problem:
        code, message = problem
        print(message, file=sys.stderr if code else sys.stdout)
        return code
    rows = dead_letters.outstanding(storage, args.partition).read()
    if args.run:
        rows = rows.filter(pc.equal(rows.column("run_id"), args.run))
    if args.action == "list":
        print(dead_letters.describe(rows.to_pylist(), limit=args.limit))
        return 0
    from mc_pipeline.registry import YamlClientRegistry, parse_partition_key

    ometria = OmetriaResource()
    client = YamlClientRegistry(str(registry)).client(parse_partition_key(args.partition)[0])
    try:
        result = dead_letters.replay(
            args.partition,
            storage=storage,
            ometria=ometria,
            client=client,
            run_id=args.run,
            dry_run=args.dry_run,
            limit=ometria.max_dead_letter_share,
        )
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    p = result.plan
    if args.dry_run:
        print(
            f"{p.tried} dead letters: would push {len(p.records)}, {len(p.failing)} fail conversion or validation "
            "(what Ometria answers is known only when pushed)"
        )
    else:
        print(
            f"{p.tried} dead letters: pushed {len(p.records)}, {len(p.records) - len(result.refused)} accepted, "
            f"{len(result.refused)} refused by Ometria, {len(p.failing)} fail conversion or validation; "
            f"{len(result.still_dead)} still failing"
        )
    if result.still_dead:
        print(dead_letters.describe(result.still_dead, limit=10))
    if result.state is not None and os.environ.get("DAGSTER_HOME"):
        with _instance() as instance:
            dead_letters.report(instance, args.partition, result.state)
    return 0 if not result.still_dead else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mc-pipeline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sb = sub.add_parser("sandbox", help="run the local Mailchimp + Ometria sandbox in the foreground")
    sb.add_argument("--config", help="sandbox YAML (accounts, lists, latency, faults); flags override it")
    sb.add_argument("--host", default=None, help="default 127.0.0.1")
    sb.add_argument("--port", type=int, default=None, help="default 8080")
    sb.add_argument("--seed", type=int, default=None)
    sb.add_argument("--clients", type=int, default=1)
    sb.add_argument("--lists", type=int, default=2, help="lists per client")
    sb.add_argument("--members", default="20000,100000", help="list sizes, cycled over each client's lists")
    sb.add_argument("--mc-latency-ms", type=float, default=None, help="Mailchimp base latency per request")
    sb.add_argument("--mc-per-kb-ms", type=float, default=None, help="Mailchimp latency per KiB served")
    sb.add_argument("--om-latency-ms", type=float, default=None, help="Ometria latency per push")
    sb.add_argument("--error-rate", type=float, default=0.0, help="share of 500/503 answers")
    sb.add_argument("--drop-rate", type=float, default=0.0, help="share of dropped connections")
    sb.add_argument("--truncate-rate", type=float, default=0.0, help="share of cut JSON bodies")
    sb.add_argument("--public-url", help="URL clients use to reach this sandbox (for --write-registry)")
    sb.add_argument("--write-registry", help="write a client registry pointing at this sandbox")
    sb.add_argument("--write-env", help="write the sandbox keys as an env file (mode 600)")
    sb.set_defaults(func=cmd_sandbox)

    init = sub.add_parser("init", help="write a project-local Dagster instance with production's run queue limits")
    init.add_argument("--home", default=".dagster_home", help="the folder DAGSTER_HOME will name")
    init.set_defaults(func=cmd_init)

    demo = sub.add_parser("demo", help="full and incremental syncs through Dagster against the sandbox")
    demo.add_argument("--clients", type=int, default=1, help="clients (accounts), each with the lists below")
    demo.add_argument("--members", default="20000,100000", help="sizes of each client's lists")
    demo.add_argument("--home", default=".mc_pipeline_demo", help="folder for the Dagster instance and data")
    demo.add_argument("--port", type=int, default=8765, help="sandbox port (kept so the registry stays valid)")
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--keep", action="store_true", help="keep the previous demo's history")
    demo.set_defaults(func=cmd_demo)

    parts = sub.add_parser("partitions", help="list, add or remove mailchimp_lists partitions (DAGSTER_HOME)")
    parts.add_argument("action", choices=["list", "add", "remove"])
    parts.add_argument("keys", nargs="*", metavar="CLIENT:LIST", help="e.g. acme:1a2d7ebf82")
    parts.add_argument(
        "--registry", action="store_true", help="list: the keys the registry (MC_PIPELINE_CLIENTS) gives, not Dagster's"
    )
    parts.set_defaults(func=cmd_partitions)

    dead = sub.add_parser("dead-letters", help="list a partition's dead letters, or replay them after a fix")
    dead.add_argument("action", choices=["list", "replay"])
    dead.add_argument("partition", metavar="CLIENT:LIST")
    dead.add_argument("--run", help="only those recorded by this run (default: every outstanding one)")
    dead.add_argument("--dry-run", action="store_true", help="convert and validate as the replay does, push nothing")
    dead.add_argument("--limit", type=int, default=20, help="dead letters shown one by one (list)")
    dead.set_defaults(func=cmd_dead_letters)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
