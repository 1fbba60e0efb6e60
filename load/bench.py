"""Bounded CheckAndConsume benchmark on loopback: decisions/s and latency percentiles.

    python load/bench.py                       # starts its own server on an embedded Valkey
    python load/bench.py --address 127.0.0.1:50051 --token "$RATELIMITD_TOKEN"

It creates one organization with limits high enough that most calls are
admitted (every call still evaluates and charges all four windows of both the
project and the organization), then keeps ``--concurrency`` calls in flight
from ``--processes`` client processes (``--connections`` each, 4 per
server worker by default; ``--mix stream`` sends them on one
CheckAndConsumeStream per connection) until ``--requests`` calls or
``--seconds`` have passed, whichever comes first. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratelimitd.cli.client import Api  # noqa: E402
from ratelimitd.cli.limits import parse_limit_args  # noqa: E402
from ratelimitd.v1 import admin_pb2 as apb  # noqa: E402
from ratelimitd.v1 import rate_limit_service_pb2_grpc  # noqa: E402
from ratelimitd.v1 import ratelimit_pb2 as pb  # noqa: E402

MODEL = "llama-3.1-8b-instant"
HUGE = 10**11


async def setup(address: str, token: str, projects: int) -> list[str]:
    api = Api(address, token)
    org = await api.orgs.CreateOrganization(apb.CreateOrganizationRequest(name="bench"))
    await api.orgs.SetOrganizationLimits(
        apb.SetOrganizationLimitsRequest(
            organization_id=org.id, set=parse_limit_args(MODEL, [f"{n}={HUGE}" for n in ("rpm", "rpd", "tpm", "tpd")])
        ),
    )
    keys = []
    for i in range(projects):
        p = await api.projects.CreateProject(apb.CreateProjectRequest(organization_id=org.id, name=f"bench-{i}"))
        await api.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(
                organization_id=org.id, project_id=p.id, set=parse_limit_args(MODEL, [f"rpm={HUGE}", f"tpm={HUGE}"])
            ),
        )
        k = await api.projects.CreateApiKey(
            apb.CreateApiKeyRequest(organization_id=org.id, project_id=p.id, name="bench")
        )
        keys.append(k.secret)
    await api.channel.close()
    return keys


async def drive(
    address: str, keys: list[str], requests: int, seconds: float, concurrency: int, mix: str, connections: int
) -> dict[str, object]:
    # One connection per channel (a local subchannel pool): the server's workers share
    # the port by connection, so a client with one connection keeps one worker busy.
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(connections)
    ]
    stubs = [rate_limit_service_pb2_grpc.RateLimitServiceStub(ch) for ch in channels]
    reqs = [pb.CheckRequest(api_key=k, model=MODEL, tokens=500) for k in keys]
    if mix == "stream":
        return await drive_streams(stubs, reqs, requests, seconds, concurrency)
    latencies: list[float] = []
    report_latencies: list[float] = []
    allowed = errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal sent, allowed, errors
        i = w
        stub = stubs[w % len(stubs)]
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            req = reqs[i % len(reqs)]
            t0 = time.perf_counter()
            try:
                r = await stub.CheckAndConsume(req)
                allowed += r.allowed
                t1 = time.perf_counter()
                latencies.append(t1 - t0)
                if mix == "report" and r.allowed:
                    await stub.ReportUsage(
                        pb.ReportUsageRequest(
                            api_key=req.api_key, request_id=r.request_id, input_tokens=300 + i % 200,
                            output_tokens=100 + i % 300, cached_tokens=i % 100, status_code=200, latency_ms=5,
                        )
                    )  # fmt: skip
                    report_latencies.append(time.perf_counter() - t1)
            except grpc.aio.AioRpcError:
                errors += 1
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    return {
        "latencies": latencies, "report_latencies": report_latencies, "allowed": allowed, "errors": errors,
        "elapsed": elapsed,
    }  # fmt: skip


async def drive_streams(
    stubs: list[rate_limit_service_pb2_grpc.RateLimitServiceAsyncStub],
    reqs: list[pb.CheckRequest],
    requests: int,
    seconds: float,
    concurrency: int,
) -> dict[str, object]:
    """One CheckAndConsumeStream per connection, ``concurrency`` requests in flight over them all."""
    latencies: list[float] = []
    counts = {"sent": 0, "allowed": 0, "errors": 0}
    deadline = time.perf_counter() + seconds

    async def one_stream(stub: rate_limit_service_pb2_grpc.RateLimitServiceAsyncStub, window: int) -> None:
        call = stub.CheckAndConsumeStream()
        room = asyncio.Semaphore(window)
        sent_at: collections.deque[float] = collections.deque()

        async def send() -> None:
            while True:
                await room.acquire()
                if counts["sent"] >= requests or time.perf_counter() >= deadline:
                    break
                request = reqs[counts["sent"] % len(reqs)]
                counts["sent"] += 1
                sent_at.append(time.perf_counter())
                await call.write(request)
            await call.done_writing()

        sending = asyncio.get_running_loop().create_task(send())
        async for reply in call:
            latencies.append(time.perf_counter() - sent_at.popleft())
            room.release()
            counts["allowed"] += reply.allowed
            counts["errors"] += reply.error_code != 0
        await sending

    n = len(stubs)
    windows = [concurrency // n + (i < concurrency % n) for i in range(n)]
    start = time.perf_counter()
    await asyncio.gather(*(one_stream(stub, w) for stub, w in zip(stubs, windows, strict=True) if w))
    elapsed = time.perf_counter() - start
    return {
        "latencies": latencies, "report_latencies": [], "allowed": counts["allowed"], "errors": counts["errors"],
        "elapsed": elapsed,
    }  # fmt: skip


def client_process(args: tuple[str, list[str], int, float, int, str, int]) -> dict[str, object]:
    import uvloop

    return uvloop.run(drive(*args))


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", help="a running server; default: start one")
    ap.add_argument("--token", default=os.environ.get("RATELIMITD_TOKEN"))
    ap.add_argument("--redis-url", help="when starting a server: use this storage instead of an embedded Valkey")
    ap.add_argument("--requests", type=int, default=50_000, help="stop after this many calls (all processes)")
    ap.add_argument("--seconds", type=float, default=20.0, help="stop after this long")
    ap.add_argument("--concurrency", type=int, default=64, help="calls in flight per client process")
    ap.add_argument("--processes", type=int, default=1, help="client processes")
    ap.add_argument("--workers", type=int, default=1, help="when starting a server: its worker processes")
    ap.add_argument("--projects", type=int, default=16, help="projects (keys) the load is spread over")
    ap.add_argument(
        "--mix",
        choices=["check", "report", "stream"],
        default="check",
        help="report: every admitted check is followed by ReportUsage; stream: CheckAndConsumeStream",
    )
    ap.add_argument(
        "--connections", type=int, help="connections per client process (default: 4 per server worker, at least 4)"
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--setup-only", action="store_true", help="create the org against --address, print one key")
    args = ap.parse_args()
    if args.setup_only:
        print(asyncio.run(setup(args.address, args.token, 1))[0])
        return 0

    server = None
    tmp = tempfile.TemporaryDirectory(prefix="ratelimitd-bench-")
    try:
        if args.address is None:
            token = "rlt_bench"
            cmd = [sys.executable, "-m", "ratelimitd", "serve", "--listen", "127.0.0.1:50777", "--data-dir", tmp.name]
            cmd += ["--workers", str(args.workers)]
            if args.redis_url:
                cmd += ["--redis-url", args.redis_url]
            server = subprocess.Popen(
                cmd, env={**os.environ, "RATELIMITD_OPERATOR_TOKEN": token, "RATELIMITD_LOG_LEVEL": "WARNING"},
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            address = "127.0.0.1:50777"
            _wait_port(address)
        else:
            address, token = args.address, args.token
        keys = asyncio.run(setup(address, token, args.projects))
        per = args.requests // args.processes
        connections = args.connections or 4 * max(1, args.workers)
        jobs = [(address, keys, per, args.seconds, args.concurrency, args.mix, connections)] * args.processes
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            results = pool.map(client_process, jobs)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        tmp.cleanup()

    lat = sorted(x for r in results for x in r["latencies"])  # type: ignore[attr-defined]
    elapsed = max(float(r["elapsed"]) for r in results)  # type: ignore[arg-type]
    summary = {
        "calls": len(lat),
        "allowed": sum(int(r["allowed"]) for r in results),  # type: ignore[call-overload]
        "errors": sum(int(r["errors"]) for r in results),  # type: ignore[call-overload]
        "seconds": round(elapsed, 2),
        "decisions_per_s": round(len(lat) / elapsed),
        "p50_ms": round(percentile(lat, 0.50) * 1000, 3),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(lat) * 1000, 3),
        "concurrency": args.concurrency * args.processes,
    }
    reports = sorted(x for r in results for x in r["report_latencies"])  # type: ignore[attr-defined]
    if reports:
        summary |= {
            "reports": len(reports),
            "calls_per_s": round((len(lat) + len(reports)) / elapsed),
            "report_p50_ms": round(percentile(reports, 0.50) * 1000, 3),
            "report_p99_ms": round(percentile(reports, 0.99) * 1000, 3),
        }
    print(json.dumps(summary) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in summary.items()))
    return 0


def _wait_port(address: str, timeout_s: float = 20) -> None:
    import socket

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"no server on {address}")


if __name__ == "__main__":
    raise SystemExit(main())
