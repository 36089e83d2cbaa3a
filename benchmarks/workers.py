"""What runs inside the measured processes: `python -m benchmarks.workers TASK args.json out.json`.

Each task does its setup first (imports, loading data, building clients), then, when asked to,
waits at a barrier so that concurrent workers start together, then measures its own part
(wall and CPU) and writes a JSON report. The orchestrator adds what the kernel says the whole
process cost (rusage: CPU and peak RSS), so a worker never has to guess its own overhead.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def task(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    TASKS[fn.__name__.removeprefix("task_")] = fn
    return fn


def barrier(args: dict[str, Any]) -> float:
    """Signal readiness and wait for the orchestrator's go (see harness.release); returns the epoch."""
    ready = args.get("ready_file")
    if ready:
        Path(ready).write_text(str(os.getpid()))
        go = Path(args["go_file"])
        while not go.exists():
            time.sleep(0.002)
    return time.time()


def registry_client(client_id: str):
    from mc_pipeline.registry import YamlClientRegistry

    return YamlClientRegistry(os.environ["MC_PIPELINE_CLIENTS"]).client(client_id)


# ------------------------------------------------------------------------------------ extraction
def _timed_session(session: Any, log: list[tuple[float, float]]) -> None:
    """Record (start, end) of every HTTP request the client sends (body included)."""
    plain = session.get

    def get(*a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        try:
            return plain(*a, **kw)
        finally:
            log.append((started, time.perf_counter()))

    session.get = get


@task
def task_extract(args: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's MailchimpClient.fetch over a whole list (the members' sweep), as member_pages calls it:
    each page gzipped to disk on the fetching thread (`on_page: gzip`), or only counted."""
    from mc_pipeline.resources import MailchimpResource
    from mc_pipeline.storage import RunFolder

    client = registry_client(args["client_id"])
    resource = MailchimpResource()
    scratch = Path(args["scratch"])
    scratch.mkdir(parents=True, exist_ok=True)
    gz = args.get("on_page", "gzip") == "gzip"

    def once(tag: str) -> dict[str, Any]:
        mc = resource.client(client)
        requests_log: list[tuple[float, float]] = []
        _timed_session(mc.session, requests_log)
        folder = RunFolder(scratch / tag)

        class Writer:  # what member_pages does with each page (RunFolder.write_page), or nothing
            def write_page(self, kind: str, pass_no: int, offset: int, raw: bytes) -> None:
                if gz:
                    folder.write_page(kind, pass_no, offset, raw)

        cpu0, t0 = time.process_time(), time.perf_counter()
        window = mc.fetch(args["list_id"], Writer(), since=None, sweep_archived=False).members
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        mc.close()
        shutil.rmtree(folder.root, ignore_errors=True)
        durations = [end - start for start, end in requests_log]
        first = min(requests_log)
        first_answer = min(end for _, end in requests_log)
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "members": window.total_first,  # the window's members (each once)
            "fetched": window.stats.rows,  # members received, page overlaps included
            "pages": window.stats.pages,
            "requests": window.stats.calls,
            "retries": window.stats.retries,
            "throttled": window.stats.throttled,
            "bytes": window.stats.bytes,
            "passes": window.passes,
            "first_page_s": first[1] - first[0],
            "first_wave": sum(start < first_answer for start, _ in requests_log),  # sent before any answer
            "request_s_mean": statistics.fmean(durations),
            "request_s_sum": sum(durations),
        }

    for i in range(args.get("warmup", 0)):  # the server's first pass over a projection is not measured
        once(f"w{i}")
    started_epoch = barrier(args)
    runs = [once(f"r{i}") for i in range(args.get("repeats", 1))]
    ended = time.time()
    return {
        "runs": runs,
        "started": started_epoch,
        "ended": ended,
        "page_costs": _page_costs(mc_page(resource, client, args)),
    }


def mc_page(resource: Any, client: Any, args: dict[str, Any]) -> bytes:
    """One full page of the list, as the fetcher receives it."""
    from mc_pipeline.resources.paging import FetchStats, window_params

    mc = resource.client(client)
    try:
        return mc._page(args["list_id"], 0, window_params(None, None, None), FetchStats()).raw
    finally:
        mc.close()


def _page_costs(raw: bytes, rounds: int = 20) -> dict[str, float]:
    """CPU of what the fetching threads do with each page besides the HTTP exchange (ms per page):
    MailchimpClient._get_once parses the whole body, member_pages gzips it."""
    import orjson

    out = {}
    for name, fn in (
        ("orjson_loads_ms", orjson.loads),
        ("gzip_level1_ms", lambda b: gzip.compress(b, compresslevel=1)),
    ):
        c0 = time.process_time()
        for _ in range(rounds):
            fn(raw)
        out[name] = round((time.process_time() - c0) / rounds * 1000, 3)
    out["page_kib"] = round(len(raw) / 1024, 1)
    return out


@task
def task_sequential(args: dict[str, Any]) -> dict[str, Any]:
    """The way common open-source connectors page Mailchimp: one connection, count=1000, offsets
    one after another (see benchmarks/sequential.py)."""
    from benchmarks.sequential import page_sequentially

    fields = args.get("fields")
    if fields == "pipeline":  # the pipeline's own projection
        from mc_pipeline.resources.mailchimp import MEMBERS_FIELDS_PARAM

        fields = MEMBERS_FIELDS_PARAM
    return page_sequentially(
        args["base_url"], args["key"], args["list_id"], fields=fields, max_pages=args.get("max_pages")
    )


@task
def task_fetch_pages(args: dict[str, Any]) -> dict[str, Any]:
    """Save a list's pages (raw, as received) for the CPU benchmark: real pages, fetched once."""
    from mc_pipeline.resources import MailchimpResource

    dest = Path(args["dest"])
    dest.mkdir(parents=True, exist_ok=True)
    mc = MailchimpResource().client(registry_client(args["client_id"]))

    class Writer:
        def write_page(self, kind: str, pass_no: int, offset: int, raw: bytes) -> None:
            (dest / f"{kind}-p{pass_no}-{offset:09d}.json").write_bytes(raw)

    window = mc.fetch(args["list_id"], Writer(), since=None, sweep_archived=False).members
    return {"pages": window.stats.pages, "members": window.total_first, "bytes": window.stats.bytes}


@task
def task_make_contacts(args: dict[str, Any]) -> dict[str, Any]:
    """Contact records for the import runs: the saved pages staged and transformed (not measured)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mc_pipeline.staging import StagingWriter
    from mc_pipeline.transform import CONTACT_SCHEMA, to_contacts

    with tempfile.TemporaryDirectory(prefix="bench-contacts-") as tmp:
        writer = StagingWriter(Path(tmp, "members.parquet"))
        for f in sorted(Path(args["pages_dir"]).glob("*.json")):
            writer.write_page(f.read_bytes(), int(f.stem.rsplit("-", 1)[1]))
        writer.close()
        good, _ = to_contacts(pq.read_table(Path(tmp, "members.parquet")), args["collection"])
    good = good.slice(0, args["records"])
    if good.num_rows < args["records"]:
        raise ValueError(f"only {good.num_rows} contacts in the saved pages, {args['records']} wanted")
    pq.write_table(good.cast(CONTACT_SCHEMA), args["dest"], compression="zstd", row_group_size=50_000)
    return {"records": good.num_rows, "columns": pa.table(good).num_columns}


# ------------------------------------------------------------------------------------ import
@task
def task_import(args: dict[str, Any]) -> dict[str, Any]:
    """The import op (`import_to_ometria`) invoked directly on a contacts file: batches of 100
    streamed from Parquet to the OmetriaClient's pushers behind the account's limiter."""
    from datetime import UTC, datetime

    from dagster import build_op_context

    from mc_pipeline.assets.models import ContactsFile, RunFiles, Window
    from mc_pipeline.assets.ometria import import_to_ometria
    from mc_pipeline.resources import ClientRegistryResource, OmetriaResource
    from mc_pipeline.storage import PipelineStorage

    client = registry_client(args["client_id"])
    list_id = args["list_id"]
    partition = f"{client.id}:{list_id}"
    run_id = f"bench{os.getpid()}"
    storage = PipelineStorage()
    folder = storage.run_folder(partition, run_id)
    contacts = ContactsFile(
        run=RunFiles(
            partition=partition,
            client_id=client.id,
            list_id=list_id,
            run_id=run_id,
            folder=str(folder.root),
            window=Window(since=datetime.now(UTC), before=datetime.now(UTC), full_refresh=False),
            push_all=True,  # the push rate is measured: every record is sent, also when a run before sent it
        ),
        total_items=args["records"],
        staged_rows=args["records"],
        path=args["contacts"],
        collection=client.collection(list_id),
        records=args["records"],
        dead_letters=0,
    )
    resources = {
        "registry": ClientRegistryResource(path=os.environ["MC_PIPELINE_CLIENTS"]),
        "ometria": OmetriaResource(**args.get("ometria", {})),
        "storage": storage,
    }
    with build_op_context(resources=resources, partition_key=partition) as context:
        started_epoch = barrier(args)
        cpu0, t0 = time.process_time(), time.perf_counter()
        output = import_to_ometria(context, contacts=contacts)  # by name: the op takes its config first
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    md = {k: getattr(v, "value", v) for k, v in output.metadata.items()}
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "started": started_epoch,
        "ended": time.time(),
        "records": args["records"],
        **{k: md.get(k) for k in ("pushed", "accepted", "rejected", "requests", "throttled_429", "retries", "seconds")},
    }


# ------------------------------------------------------------------------------------ Dagster runs
def _run_figures(instance: Any, result: Any) -> dict[str, Any]:
    """Per-step seconds (from the run's events) and the assets' metadata."""
    from dagster import DagsterEventType

    steps: dict[str, dict[str, float]] = {}
    for entry in instance.all_logs(result.run_id):
        event = entry.dagster_event
        if event is None or not entry.step_key:
            continue
        if event.event_type == DagsterEventType.STEP_START:
            steps.setdefault(entry.step_key, {})["start"] = entry.timestamp
        elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            steps.setdefault(entry.step_key, {})["end"] = entry.timestamp
    done = {k: v for k, v in steps.items() if "start" in v and "end" in v}
    seconds = {k: round(v["end"] - v["start"], 3) for k, v in done.items()}
    metadata: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        metadata[mat.asset_key.to_user_string()] = {
            k: v.value for k, v in mat.metadata.items() if isinstance(v.value, int | float | str | bool)
        }
    for event in result.all_events:
        if event.event_type_value == "STEP_OUTPUT" and (event.step_key or "").endswith("to_ometria_records"):
            md = event.event_specific_data.metadata or {}
            metadata["to_ometria_records"] = {
                k: v.value for k, v in md.items() if isinstance(v.value, int | float | str | bool)
            }
    return {
        "step_seconds": seconds,
        "step_spans": {k: [v["start"], v["end"]] for k, v in done.items()},
        "metadata": metadata,
    }


@task
def task_sync(args: dict[str, Any]) -> dict[str, Any]:
    """Syncs through Dagster: the sync job's `execute_in_process` for each partition, one after the
    other, against the instance of DAGSTER_HOME. Used for the end-to-end and memory runs (one
    partition each) and for seeding and measuring many small lists."""
    from dagster import DagsterInstance

    from mc_pipeline.definitions import defs
    from mc_pipeline.jobs import SYNC_JOB, sync_run_config
    from mc_pipeline.partitions import MAILCHIMP_LISTS
    from mc_pipeline.resources import MailchimpResource, OmetriaResource

    instance = DagsterInstance.get()
    partitions = args["partitions"]
    new = [p for p in partitions if not instance.has_dynamic_partition(MAILCHIMP_LISTS, p)]
    if new:
        instance.add_dynamic_partitions(MAILCHIMP_LISTS, new)
    job = defs.resolve_job_def(SYNC_JOB)
    overrides: dict[str, Any] = {}
    if "ometria" in args:
        overrides["ometria"] = OmetriaResource(**args["ometria"])
    if "mailchimp" in args:
        overrides["mailchimp"] = MailchimpResource(**args["mailchimp"])
    detail = args.get("detail", True)
    runs = []
    started_epoch = barrier(args)
    for partition in partitions:
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = job.execute_in_process(
            partition_key=partition,
            instance=instance,
            run_config=sync_run_config(full_refresh=args.get("full_refresh", False)),
            resources=overrides or None,
            raise_on_error=False,
        )
        run = {
            "partition": partition,
            "success": result.success,
            "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0,
        }
        if detail or not result.success:
            run.update(_run_figures(instance, result))
        else:
            pages = next(
                (
                    e.event_specific_data.materialization.metadata
                    for e in result.get_asset_materialization_events()
                    if e.event_specific_data.materialization.asset_key.to_user_string() == "mailchimp/member_pages"
                ),
                {},
            )
            run["api_calls"] = pages["api_calls"].value if "api_calls" in pages else None
        runs.append(run)
    return {"runs": runs, "started": started_epoch, "ended": time.time()}


# ------------------------------------------------------------------------------------ CPU of the transform
def _load(name: str, path: str | None, default: str) -> Any:
    """The module under test: the package's, or another version of it from a file (before/after)."""
    if path is None:
        return importlib.import_module(default)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def staging_chain(staging: Any, transform: Any, pages: list[tuple[int, bytes]], tmp: Path) -> dict[str, Any]:
    """Pages -> StagingWriter -> to_contacts on each row group read back, CPU time of each half."""
    import pyarrow.parquet as pq

    c0 = time.process_time()
    writer = staging.StagingWriter(tmp / "members.parquet")
    for offset, raw in pages:
        writer.write_page(raw, offset)
    summary = writer.close()
    c1 = time.process_time()
    source = pq.ParquetFile(tmp / "members.parquet")
    records = dead = 0
    for i in range(source.num_row_groups):
        good, bad = transform.to_contacts(source.read_row_group(i), "mailchimp-0123456789")
        records += good.num_rows
        dead += bad.num_rows
    c2 = time.process_time()
    return {
        "staged": summary.rows,
        "duplicates": summary.duplicates,
        "records": records,
        "dead_letters": dead + len(summary.dead_letters),
        "staging_cpu_s": c1 - c0,
        "transform_cpu_s": c2 - c1,
        "cpu_s": c2 - c0,
    }


@task
def task_transform_cpu(args: dict[str, Any]) -> dict[str, Any]:
    """Raw pages -> staged rows (StagingWriter: parse_page, Parquet, de-duplication) -> Ometria
    records (to_contacts on each row group read back), in one thread; process CPU time per member.

    `modules` may name other versions of staging.py and transform.py (the code before an
    optimisation), so before and after are measured in the same run on the same pages.
    """

    modules = args.get("modules") or {}
    staging = _load("bench_staging", modules.get("staging"), "mc_pipeline.staging")
    transform = _load("bench_transform", modules.get("transform"), "mc_pipeline.transform")
    files = sorted(Path(args["pages_dir"]).glob("*.json"))[: args.get("pages")]
    pages = [(int(f.stem.rsplit("-", 1)[1]), f.read_bytes()) for f in files]

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        for i in range(args.get("warmup", 1) + args.get("repeats", 5)):
            folder = Path(tmp, f"r{i}")
            folder.mkdir()
            run = staging_chain(staging, transform, pages, folder)
            if i >= args.get("warmup", 1):
                runs.append(run)
        profile = None
        if args.get("profile"):
            import cProfile
            import io
            import pstats

            folder = Path(tmp, "profile")
            folder.mkdir()
            prof = cProfile.Profile()
            prof.enable()
            staging_chain(staging, transform, pages, folder)
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
            profile = text.getvalue()
    return {"pages": len(pages), "runs": runs, "profile": profile, "floor": _parse_floor([raw for _, raw in pages])}


def _parse_floor(pages: list[bytes]) -> dict[str, float]:
    """CPU per member of only reading the pages' JSON (best of 3): what no transform can go below."""
    import orjson

    from benchmarks.parsers import read_page_json

    members = sum(len(orjson.loads(raw)["members"]) for raw in pages)

    def best(read: Any) -> float:
        times = []
        for _ in range(3):
            c0 = time.process_time()
            for raw in pages:
                read(raw)
            times.append(time.process_time() - c0)
        return min(times) / max(members, 1) * 1e6

    return {"arrow_json_us_per_member": best(read_page_json), "orjson_loads_us_per_member": best(orjson.loads)}


@task
def task_imports(args: dict[str, Any]) -> dict[str, Any]:
    """What every run worker pays before its run: the interpreter, Dagster, and the code location."""
    t0 = time.perf_counter()
    import dagster._grpc.impl  # noqa: F401  (what a launched run process unpickles its target from)

    import mc_pipeline.definitions  # noqa: F401

    return {"wall_s": time.perf_counter() - t0}


@task
def task_push_body_cpu(args: dict[str, Any]) -> dict[str, Any]:
    """CPU per record of turning contacts into push bodies (record_dicts + orjson), for the import."""
    import pyarrow.parquet as pq

    from mc_pipeline.transform import push_body

    table = pq.read_table(args["contacts"])
    best = None
    for _ in range(3):
        c0 = time.process_time()
        for batch in table.to_batches(max_chunksize=100):
            push_body(batch)
        cpu = time.process_time() - c0
        best = cpu if best is None else min(best, cpu)
    return {"records": table.num_rows, "cpu_s": best}


def main() -> int:
    name, args_path, out_path = sys.argv[1:4]
    args = json.loads(Path(args_path).read_text())
    result = TASKS[name](args)
    tmp = Path(out_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
