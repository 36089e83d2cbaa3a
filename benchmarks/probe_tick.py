"""CPU of the change-aware schedule per unchanged list: what each probe costs the code server.

The sandbox runs in a process of its own, so this process's CPU is only the schedule's: the
registry, the watermark reads, two count requests per list and the verification's write. The
instance is PostgreSQL (as deployed); its server's CPU is measured apart (psutil, every process
named `postgres`), and the sessions and transactions opened on the database (`pg_stat_database`).
The synced state is recorded directly (`record_imports`), then the ticks of one probe cycle
(automation/cadence.py: 10 ticks of 5 minutes for the hourly promise) are evaluated with every
list unchanged; `--every 5` prints the near-real-time cost.

    PYTHONPATH=. python -m benchmarks.probe_tick --clients 50 --lists 20
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil  # type: ignore[import-untyped]
from dagster import DagsterInstance, SkipReason, build_schedule_context

from mc_pipeline.assets.watermarks import destination_of, record_imports
from mc_pipeline.automation.probes import Cadence, evaluate_tick
from mc_pipeline.local import patched_environ
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import YamlClientRegistry, parse_partition_key
from mc_pipeline.resources import ClientRegistryResource, MailchimpResource
from mc_pipeline.sandbox import SandboxConfig
from mc_pipeline.sandbox.registry import key_environment, write_pipeline_files
from mc_pipeline.sandbox.runner import serve_forever

PG = "host=127.0.0.1 port=5432 user=postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_cpu() -> float:
    total = 0.0
    for p in psutil.process_iter(["name"]):
        if p.info["name"] and p.info["name"].startswith("postgres"):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def _pg_counters(db: str) -> tuple[int, int]:
    """Sessions opened on the database and transactions ended in it (PostgreSQL 15's counters,
    flushed by each backend within a second; read from another database)."""
    import psycopg2  # type: ignore[import-untyped]

    time.sleep(1.2)
    with psycopg2.connect(PG + " dbname=postgres") as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT sessions, xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (db,))
        sessions, xacts = cur.fetchone()
    conn.close()
    return int(sessions), int(xacts)


def _pg_instance(home: Path, db: str) -> DagsterInstance:
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_db:\n      hostname: 127.0.0.1\n      port: 5432\n"
        f"      username: postgres\n      password: ''\n      db_name: {db}\n      scheme: postgresql+psycopg2\n"
        "telemetry:\n  enabled: false\n"
    )
    return DagsterInstance.from_config(str(home))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--lists", type=int, default=20)
    ap.add_argument("--every", type=int, default=60, help="minutes between verifications of each list")
    args = ap.parse_args()
    port = _free_port()
    config = SandboxConfig.generated(clients=args.clients, lists_per_client=args.lists, members=20, port=port)
    server = multiprocessing.get_context("spawn").Process(target=serve_forever, args=(config,), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{base}/_sandbox/health", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    import psycopg2  # type: ignore[import-untyped]

    db = f"mc_pipeline_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(PG + " dbname=postgres")
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{db}"')
    try:
        with tempfile.TemporaryDirectory() as tmp:
            registry = Path(tmp) / "clients.yaml"
            write_pipeline_files(config, base, registry, None)
            with patched_environ(key_environment(config)), _pg_instance(Path(tmp), db) as instance:
                reg = YamlClientRegistry(registry)
                keys = [f"{a.client_id}:{s.id}" for a in config.accounts for s in a.lists]
                instance.add_dynamic_partitions(MAILCHIMP_LISTS, keys)
                watermark = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
                record_imports(
                    instance,
                    {
                        k: (watermark, destination_of(reg.client(parse_partition_key(k)[0]), parse_partition_key(k)[1]))
                        for k in keys
                    },
                )
                time.sleep(2)  # past the recorded watermark on the sandbox's clock (wall time here)
                cadence = Cadence(every_s=args.every * 60, tick_s=max(1, args.every // 12) * 60)
                registry_resource, mailchimp = ClientRegistryResource(path=str(registry)), MailchimpResource()
                resources = {"registry": registry_resource, "mailchimp": mailchimp}
                # A cycle in the past: every record is written after its tick, as the daemon evaluates them.
                hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
                ticks = [hour + timedelta(seconds=i * cadence.tick_s) for i in range(cadence.cycle_s // cadence.tick_s)]
                sessions0, xacts0 = _pg_counters(db)
                cpu0, pg0, wall0, verified, calls, longest = (
                    time.process_time(),
                    _postgres_cpu(),
                    time.monotonic(),
                    0,
                    0,
                    0.0,
                )
                for tick in ticks:
                    ctx = build_schedule_context(instance=instance, scheduled_execution_time=tick, resources=resources)
                    result, report = evaluate_tick(ctx, registry_resource, mailchimp, cadence)
                    assert isinstance(result, SkipReason), "every list is unchanged: no run"
                    print(f"  {tick:%H:%M} {report.summary()}")
                    verified, calls, longest = (
                        verified + len(report.verified),
                        calls + report.calls,
                        max(longest, report.seconds),
                    )
                cpu, pg, wall = time.process_time() - cpu0, _postgres_cpu() - pg0, time.monotonic() - wall0
                sessions1, xacts1 = _pg_counters(db)
                per = max(verified, 1)
                print(
                    f"{len(keys)} lists, each verified once a {cadence.cycle_s // 60}-min cycle ({len(ticks)} ticks): "
                    f"{verified} verified, {calls} Mailchimp calls ({calls / max(verified, 1):.2f} per list)\n"
                    f"code server CPU {cpu:.2f}s = {1000 * cpu / max(verified, 1):.1f} ms per list verified; "
                    f"PostgreSQL server CPU {pg:.2f}s = {1000 * pg / max(verified, 1):.1f} ms per list; "
                    f"wall {wall:.1f}s, longest tick {longest:.1f}s\n"
                    f"PostgreSQL sessions {sessions1 - sessions0} = {(sessions1 - sessions0) / per:.2f} per list "
                    f"verified; transactions {xacts1 - xacts0} = {(xacts1 - xacts0) / per:.2f} per list"
                )
    finally:
        server.terminate()
        server.join(10)
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    main()
