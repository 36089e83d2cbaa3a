"""Sandbox speed: the server's CPU per 1000-member page, and 200 concurrent connections held.

Starts `mc-pipeline sandbox` in subprocesses (as a pipeline run would meet it) and measures on the
wire plus through GET /_sandbox/stats:

(a) `server_cpu_s` (CPU time of the server's event-loop thread) before and after paging a
    100,000-member list with count=1000, with no `fields` and with a `fields` projection, each
    twice: a first pass (nothing cached for that query/projection) and a second pass (cached).
(b) 20 clients x 10 concurrent requests = 200 in flight at once, with 250 ms latency, sent by one
    asyncio client: all must succeed without a 429, each wave should take about one latency,
    the server must have had all 200 under way at once (from its request log), and every key's
    peak_in_flight must be exactly 10.

Goals: at most 20 ms of server CPU per 1000-member page; 200 concurrent connections held.

    .venv/bin/python benchmarks/sandbox_speed.py [--members 100000] [--waves 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import requests

from mc_pipeline.resources.mailchimp import MEMBERS_FIELDS_PARAM

CPU_GOAL_MS = 20.0
# The fields the pipeline asks for, so the projected case measures what a sync costs the server.
PROJECTION = MEMBERS_FIELDS_PARAM


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base_url: str
    env: dict[str, str]
    registry: dict[str, Any]
    startup_s: float

    def stats(self) -> dict[str, Any]:
        return requests.get(f"{self.base_url}/_sandbox/stats", timeout=10).json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def sandbox(*args: str, start_timeout_s: float = 300.0) -> Iterator[Server]:
    """`mc-pipeline sandbox ARGS` on a free port; ended (by its own handle) on exit."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="sandbox-speed-") as tmp:
        port = free_port()
        registry, env_file, log = Path(tmp, "registry.yaml"), Path(tmp, "sandbox.env"), Path(tmp, "sandbox.log")
        command = [sys.executable, "-m", "mc_pipeline.cli", "sandbox", "--port", str(port)]
        command += ["--write-registry", str(registry), "--write-env", str(env_file), *args]
        started = time.perf_counter()
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        base_url = f"http://127.0.0.1:{port}"
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"sandbox exited with {proc.returncode}:\n{log.read_text()}")
                try:
                    if requests.get(f"{base_url}/_sandbox/health", timeout=1).ok:
                        break
                except requests.exceptions.ConnectionError:
                    pass
                if time.perf_counter() - started > start_timeout_s:
                    raise RuntimeError(f"sandbox not healthy after {start_timeout_s}s:\n{log.read_text()}")
                time.sleep(0.1)
            startup_s = time.perf_counter() - started
            env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if line)
            yield Server(proc, base_url, env, yaml.safe_load(registry.read_text()), startup_s)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(15)


def key_of(server: Server, client: dict[str, Any]) -> str:
    return server.env[client["mailchimp"]["api_key"]["env"]]


# ------------------------------------------------------------------------------------------ (a) CPU per page
def page_through(session: requests.Session, url: str, key: str, fields: str | None) -> dict[str, float]:
    """One pass over the whole list with count=1000; checks every member comes exactly once."""
    params: dict[str, Any] = {"count": 1000, "offset": 0}
    if fields:
        params["fields"] = fields
    pages = members = nbytes = 0
    total = None
    started = time.perf_counter()
    while total is None or params["offset"] < total:
        r = session.get(url, params=params, auth=("bench", key), timeout=60)
        r.raise_for_status()
        body = orjson.loads(r.content)
        total = body["total_items"]
        members += len(body["members"])
        nbytes += len(r.content)
        pages += 1
        params["offset"] += 1000
    assert members == total, (members, total)
    return {"pages": pages, "members": members, "bytes": nbytes, "wall_s": time.perf_counter() - started}


def cpu_per_page(members: int) -> dict[str, Any]:
    with sandbox("--clients", "1", "--lists", "1", "--members", str(members)) as server:
        client = server.registry["clients"][0]
        key = key_of(server, client)
        url = f"{client['mailchimp']['base_url']}/lists/{client['lists'][0]}/members"
        proc = psutil.Process(server.proc.pid)
        session = requests.Session()
        out: dict[str, Any] = {
            "members": members,
            "startup_s": round(server.startup_s, 2),
            "rss_mib_after_startup": round(proc.memory_info().rss / 2**20),
            "runs": [],
        }
        for label, fields in (("all fields", None), ("fields projection", PROJECTION)):
            for pass_name in ("first pass (uncached)", "second pass (cached)"):
                cpu0, proc0 = server.stats()["server_cpu_s"], proc.cpu_times()
                run = page_through(session, url, key, fields)
                cpu1, proc1 = server.stats()["server_cpu_s"], proc.cpu_times()
                process_cpu = (proc1.user + proc1.system) - (proc0.user + proc0.system)
                out["runs"].append(
                    {
                        "query": label,
                        "pass": pass_name,
                        "pages": run["pages"],
                        "kib_per_page": round(run["bytes"] / run["pages"] / 1024, 1),
                        "server_cpu_ms_per_page": round((cpu1 - cpu0) / run["pages"] * 1000, 2),
                        "process_cpu_ms_per_page": round(process_cpu / run["pages"] * 1000, 2),
                        "wall_ms_per_page": round(run["wall_s"] / run["pages"] * 1000, 2),
                    }
                )
        out["rss_mib_at_end"] = round(proc.memory_info().rss / 2**20)
        worst = max(r["server_cpu_ms_per_page"] for r in out["runs"])
        out["worst_server_cpu_ms_per_page"] = worst
        out["goal_met"] = worst <= CPU_GOAL_MS
        return out


# ------------------------------------------------------------------------------------------ (b) concurrency
async def _waves(targets: list[tuple[str, str, str]], per_key: int, waves: int) -> list[list[tuple[int, float, float]]]:
    """`waves` rounds of len(targets) * per_key simultaneous requests from one asyncio client
    (cheap per request, so the client does not hide the server's behaviour)."""
    import aiohttp

    out: list[list[tuple[int, float, float]]] = []
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap: the server's limit is under test
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(url: str, key: str) -> tuple[int, float, float]:
            headers = {"Authorization": "Basic " + base64.b64encode(f"bench:{key}".encode()).decode()}
            started = time.perf_counter()
            try:
                async with session.get(
                    url, params={"count": "10", "fields": "members.id,total_items"}, headers=headers
                ) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError:
                status = -1
            return status, started, time.perf_counter()

        for _ in range(waves):
            out.append(await asyncio.gather(*(one(url, key) for _, url, key in targets for _ in range(per_key))))
    return out


def _max_overlap(logs: list[dict[str, Any]]) -> int:
    """Most requests the server had under way at one instant, from its own request log."""
    events = sorted([(r["started"], 1) for r in logs] + [(r["ended"], -1) for r in logs], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def concurrency(clients: int = 20, per_key: int = 10, latency_ms: float = 250.0, waves: int = 3) -> dict[str, Any]:
    args = ("--clients", str(clients), "--lists", "1", "--members", "500", "--mc-latency-ms", str(latency_ms))
    with sandbox(*args) as server:
        targets = [
            (c["id"], f"{c['mailchimp']['base_url']}/lists/{c['lists'][0]}/members", key_of(server, c))
            for c in server.registry["clients"]
        ]
        n = len(targets) * per_key
        results = asyncio.run(_waves(targets, per_key, waves))
        wave_s = [max(end for _, _, end in w) - min(start for _, start, _ in w) for w in results]
        statuses: dict[str, int] = {}
        for status, _, _ in (x for w in results for x in w):
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        stats = requests.get(f"{server.base_url}/_sandbox/stats", params={"log": "1"}, timeout=10).json()["keys"]
        labels = [f"mailchimp:{cid}" for cid, _, _ in targets]
        peaks = {label: stats[label]["peak_in_flight"] for label in labels}
        throttled = sum(stats[label]["throttled"] for label in labels)
        logs = [r for label in labels for r in stats[label]["log"]]
        served_ms = sorted((r["ended"] - r["started"]) * 1000 for r in logs)
        latency_s = latency_ms / 1000
        return {
            "clients": clients,
            "concurrent_requests": n,
            "latency_ms": latency_ms,
            "waves": waves,
            "statuses": statuses,
            "throttled": throttled,
            "wave_wall_ms": [round(s * 1000, 1) for s in wave_s],
            "wave_wall_in_latencies": [round(s / latency_s, 2) for s in wave_s],
            "server_time_per_request_ms": {
                "min": round(served_ms[0], 1),
                "median": round(served_ms[len(served_ms) // 2], 1),
                "max": round(served_ms[-1], 1),
            },
            "server_max_requests_under_way": _max_overlap(logs),
            "peak_in_flight_per_key": sorted(set(peaks.values())),
            "goal_met": statuses == {"200": n * waves}
            and throttled == 0
            and set(peaks.values()) == {per_key}
            and max(wave_s) < 1.5 * latency_s,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args()
    result = {
        "cpu_per_1000_member_page": cpu_per_page(args.members),
        "concurrency_20_keys_x_10": concurrency(waves=args.waves),
        "goals": {"server_cpu_ms_per_page_max": CPU_GOAL_MS, "concurrent_connections": 200},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    ok = result["cpu_per_1000_member_page"]["goal_met"] and result["concurrency_20_keys_x_10"]["goal_met"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
