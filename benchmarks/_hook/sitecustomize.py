"""Per-process accounting for the many-lists benchmark (benchmarks/many_lists.py, scenario 6).

Put on PYTHONPATH of the dagster-daemon, so every Python process it starts (the code server, and
through it each run worker) records:

- when it exits, its own rusage: exact CPU and peak RSS of short-lived run processes that
  sampling would miss, and its role (daemon, code server, run);
- for every PostgreSQL session it closes, the CPU its server backend had spent, read from
  `/proc/<backend pid>/schedstat` (nanoseconds on CPU) just before the close: Dagster's storages
  open a session per operation (NullPool), so each backend serves one process, and the
  PostgreSQL server's CPU can be split by the role of the process it served. The session's
  `application_name` (PGAPPNAME) names the role too, for `pg_stat_activity`.

Inactive unless MC_BENCH_PROC_LOG is set. The benchmark's own process calls `account_sessions`
with the role "harness", so what it reads is not charged to the pipeline.
"""

import contextlib
import os
import sys
import threading
import time


def role_of(argv: list[str]) -> str:
    joined = " ".join(argv)
    if "--multiprocessing-fork" in argv or "execute_run" in joined:
        return "run"  # a run worker, spawned by the code server
    if "dagster-daemon" in joined:
        return "daemon"
    if "grpc" in joined or "code-server" in joined:
        return "code-server"
    return "other"


def backend_cpu_ns(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def account_sessions(out_dir: str, role: str):  # type: ignore[no-untyped-def]
    """One line per PostgreSQL session this process closes: the time, the backend's CPU (ns).
    Returns what stops it."""
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    path = os.path.join(out_dir, f"pg-{role}-{os.getpid()}.log")
    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    lock = threading.Lock()

    def connected(dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        with contextlib.suppress(Exception):
            record.info["mc_bench_backend"] = dbapi_connection.info.backend_pid

    def closing(dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        pid = record.info.pop("mc_bench_backend", None)
        ns = backend_cpu_ns(pid) if pid else None
        if ns is not None:
            with lock:
                out.write(f"{time.time():.3f} {ns}\n")

    event.listen(Pool, "connect", connected)
    event.listen(Pool, "close", closing)

    def remove() -> None:
        event.remove(Pool, "connect", connected)
        event.remove(Pool, "close", closing)
        out.close()

    return remove


if os.environ.get("MC_BENCH_PROC_LOG"):
    import atexit
    import json
    import resource

    _started = time.time()
    _role = role_of(list(getattr(sys, "orig_argv", sys.argv)))
    os.environ["PGAPPNAME"] = f"mc-bench-{_role}"
    with contextlib.suppress(ImportError):
        account_sessions(os.environ["MC_BENCH_PROC_LOG"], _role)

    def _record() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        entry = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "role": _role,
            "argv": [a[:200] for a in sys.argv[:4]],
            "started": _started,
            "ended": time.time(),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "maxrss_mib": usage.ru_maxrss / 1024.0,
        }
        path = os.path.join(os.environ["MC_BENCH_PROC_LOG"], f"{os.getpid()}-{int(_started * 1000)}.json")
        try:
            with open(path, "w") as out:
                json.dump(entry, out)
        except OSError:
            pass

    atexit.register(_record)
