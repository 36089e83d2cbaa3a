"""Per-process CPU accounting for the many-lists benchmark (benchmarks/scenarios.py, scenario 6).

Put on PYTHONPATH of the dagster-daemon, so every Python process it starts (the code server, and
through it each run worker) records, when it exits, its own rusage: exact CPU and peak RSS of
short-lived run processes that sampling would miss. Inactive unless MC_BENCH_PROC_LOG is set.
"""

import os

if os.environ.get("MC_BENCH_PROC_LOG"):
    import atexit
    import json
    import resource
    import sys
    import time

    _started = time.time()

    def _record() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        entry = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
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
