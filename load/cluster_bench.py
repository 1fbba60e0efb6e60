"""Decisions/s and Valkey CPU per decision: one Valkey against a three-primary Cluster.

    python load/cluster_bench.py                          # both, through `ratelimitd serve`
    python load/cluster_bench.py --mode client            # the hot-path clients alone, in-process
    python load/cluster_bench.py --seconds 5 --concurrency 128 --workers 2

``--mode server`` (default) starts, for each topology, its storage (one Valkey; a
cluster of three primaries, no replicas unless ``--replicas``, from tests/cluster.py),
then ``ratelimitd serve --redis-url ...`` (``--workers`` processes), creates
organizations through the API until each primary owns ``--orgs-per-primary`` of them
(the single Valkey gets as many), one project and key each, limits so high every call
is admitted, and drives CheckAndConsume from ``--processes`` client processes for
``--seconds`` or ``--requests``, whichever comes first (load/bench.py's driver).
Valkey CPU is utime+stime of every storage process from /proc, over the run, per
decision; the cluster line also shows how it split over the primaries.

``--mode client`` compares the hot-path clients behind the same ScriptRunner
protocol, with the engine in this process and no gRPC: storage/pipelined.py on one
Valkey, storage/cluster.py on the cluster, and redis-py's asyncio RedisCluster on
the cluster. It reports decisions/s and this process's CPU per decision.

Everything listens on 127.0.0.1, is bounded, and stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
import procs  # noqa: E402
import redis  # noqa: E402
import redis.asyncio  # noqa: E402
from redis.asyncio.cluster import RedisCluster  # noqa: E402
from redis.crc import key_slot  # noqa: E402

from ratelimitd.cli.client import Api  # noqa: E402
from ratelimitd.cli.limits import parse_limit_args  # noqa: E402
from ratelimitd.v1 import admin_pb2 as apb  # noqa: E402
from tests.cluster import BOUNDS, LocalCluster  # noqa: E402

MODEL = bench.MODEL
HUGE = bench.HUGE


def primary_index(org_id: str) -> int:
    slot = key_slot(f"rl:{{{org_id}}}:org".encode())
    return next(i for i in range(3) if BOUNDS[i] <= slot < BOUNDS[i + 1])


async def spread_orgs(address: str, per_primary: int, single: bool) -> list[str]:
    """Organizations until each primary owns ``per_primary`` (ids are drawn by the server,
    so some land where enough are already: those are left unused). One key each."""
    api = Api(address, procs.OPERATOR_TOKEN)
    chosen: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for _ in range(per_primary * 200):  # bounded: each draw lands on a given primary with p ~ 1/3
        if all(len(v) >= per_primary for v in chosen.values()):
            break
        org = await api.orgs.CreateOrganization(apb.CreateOrganizationRequest(name="bench"))
        where = len(chosen[0]) % 3 if single else primary_index(org.id)
        if len(chosen[where]) < per_primary:
            chosen[where].append(org.id)
    keys = []
    for org_id in (o for v in chosen.values() for o in v):
        limits = parse_limit_args(MODEL, [f"{n}={HUGE}" for n in ("rpm", "rpd", "tpm", "tpd")])
        await api.orgs.SetOrganizationLimits(apb.SetOrganizationLimitsRequest(organization_id=org_id, set=limits))
        p = await api.projects.CreateProject(apb.CreateProjectRequest(organization_id=org_id, name="p"))
        await api.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(
                organization_id=org_id, project_id=p.id, set=parse_limit_args(MODEL, [f"rpm={HUGE}", f"tpm={HUGE}"])
            ),
        )
        k = await api.projects.CreateApiKey(apb.CreateApiKeyRequest(organization_id=org_id, project_id=p.id, name="k"))
        keys.append(k.secret)
    await api.channel.close()
    return keys


def run_server(name: str, url: str, pids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    port = procs.free_port()
    server = procs.start_ratelimitd(url, port, workers=args.workers)
    try:
        address = f"{procs.HOST}:{port}"
        keys = asyncio.run(spread_orgs(address, args.orgs_per_primary, single=len(pids) == 1))
        per = args.requests // args.processes
        connections = 4 * max(1, args.workers)  # SO_REUSEPORT spreads connections, not calls
        jobs = [(address, keys, per, args.seconds, args.concurrency, "check", connections)] * args.processes
        node_cpu = [procs.cpu_seconds(p) for p in pids]
        server_cpu = procs.tree_cpu_seconds(procs.descendants(server.pid))
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            results = pool.map(bench.client_process, jobs)
        node_cpu = [procs.cpu_seconds(p) - before for p, before in zip(pids, node_cpu, strict=True)]
        server_cpu = procs.tree_cpu_seconds(procs.descendants(server.pid)) - server_cpu
    finally:
        procs.stop(server)
    latencies = sorted(x for r in results for x in cast(list[float], r["latencies"]))
    calls = len(latencies)
    elapsed = max(cast(float, r["elapsed"]) for r in results)
    return {
        "storage": name,
        "decisions_per_s": round(calls / elapsed),
        "errors": sum(cast(int, r["errors"]) for r in results),
        "p50_ms": round(bench.percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(bench.percentile(latencies, 0.99) * 1000, 2),
        "valkey_us_per_decision": round(sum(node_cpu) / calls * 1e6, 1),
        "valkey_cpu_split": [round(c / max(sum(node_cpu), 1e-9), 2) for c in node_cpu],
        "ratelimitd_us_per_decision": round(server_cpu / calls * 1e6, 1),
        "calls": calls,
    }


# -- the hot-path clients alone ------------------------------------------------------------


class RedisPyCluster:
    """A ScriptRunner over redis-py's asyncio RedisCluster (the maintained alternative)."""

    def __init__(self, client: RedisCluster) -> None:
        self.client = client

    async def run_script(self, script: Any, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await self.client.script_load(script.source)
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)


async def drive_engine(url: str, runner_for: Callable[[Any], Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    from ratelimitd.app import App
    from ratelimitd.engine import ids
    from ratelimitd.engine.decisions import Caller, Decider
    from ratelimitd.engine.limits import Dimensions
    from ratelimitd.engine.scripts import Scripts
    from ratelimitd.settings import Settings

    # a generous timeout: a busy shared machine must not turn into errors here
    settings = Settings.load(
        env={}, listen="127.0.0.1:0", redis_url=url, operator_token=procs.OPERATOR_TOKEN, storage_timeout_ms=5000
    )
    app = App(settings)
    await app.start()
    try:
        callers = []
        for secret in await spread_orgs(f"127.0.0.1:{app.port}", args.orgs_per_primary, single="+cluster" not in url):
            parsed = ids.parse_api_key(secret)
            assert parsed is not None
            callers.append(Caller(parsed.org_id, parsed.key_id, parsed.hash, ""))
        decider = app.decider
        if runner_for is not None:
            scripts, dims = Scripts(app.redis), Dimensions(app.settings.windows)
            decider = Decider(runner_for(app.redis), scripts, dims, app.settings.retention)
        await decider.check(callers[0], MODEL, 1, 500)  # scripts loaded
        done = 0
        deadline = time.monotonic() + args.seconds

        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while done < args.requests and time.monotonic() < deadline:
                done += 1
                await decider.check(callers[i % len(callers)], MODEL, 1, 500)
                i += 1

        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        cpu, elapsed = time.process_time() - cpu, time.perf_counter() - start
        return {"decisions_per_s": round(done / elapsed), "client_us_per_decision": round(cpu / done * 1e6, 1)}
    finally:
        await app.stop(0)


def run_clients(single_url: str, cluster_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import uvloop

    rows = []
    for name, url, runner in [
        ("pipelined, one Valkey", single_url, None),
        ("storage/cluster.py, cluster", cluster_url, None),
        ("redis-py RedisCluster, cluster", cluster_url, RedisPyCluster),
    ]:
        rows.append({"client": name} | uvloop.run(drive_engine(url, runner, args)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["server", "client"], default="server")
    ap.add_argument("--seconds", type=float, default=8.0, help="bound of each run")
    ap.add_argument("--requests", type=int, default=200_000, help="bound of each run, in decisions")
    ap.add_argument("--concurrency", type=int, default=64, help="calls in flight per client process")
    ap.add_argument("--processes", type=int, default=1, help="client processes (--mode server)")
    ap.add_argument("--workers", type=int, default=1, help="ratelimitd worker processes (--mode server)")
    ap.add_argument("--orgs-per-primary", type=int, default=4)
    ap.add_argument("--replicas", action="store_true", help="give each primary a replica (more CPU per write)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    single = procs.Valkey().start()
    tmp = tempfile.TemporaryDirectory(prefix="ratelimitd-cluster-bench-")
    cluster = LocalCluster(Path(tmp.name), replicas=args.replicas)
    try:
        primaries = [p.pid for p in cluster.procs[:3] if p is not None]
        if args.mode == "server":
            rows = [
                run_server("one Valkey", single.url, [single.pid], args),
                run_server("cluster, 3 primaries", cluster.url, primaries, args),
            ]
        else:
            rows = run_clients(single.url, cluster.url, args)
    finally:
        cluster.stop()
        tmp.cleanup()
        single.stop()
    for row in rows:
        print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
