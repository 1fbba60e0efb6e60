"""Two versions of ratelimitd, and the no-op, side by side: server CPU per call of each, interleaved.

    python load/ab.py --baseline DIR [--calls 6000] [--rounds 5] [--rps 500] [--rpc both]

DIR is another checkout of ratelimitd (``git archive main | tar -x -C /tmp/base``
makes one); it runs with this venv's Python and packages, from its own directory,
so its code is what runs. "new" is this checkout. All three servers share one
private Valkey (the keys set up once serve both, since both run the same
scripts), and every round runs the same load against each, in an order that
rotates from round to round, so a machine that gets busier or quieter mid-run
weighs on all three alike. The figures and the load are load/side_by_side.py's
(ghz when found, else its Python generator); the summary gives per server and RPC
the median CPU per call with its min..max, and last each version's ratio to the no-op.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
from bench import setup
from side_by_side import RPCS, Ghz, Load, PythonGenerator, Server, load_generator, row, run_round, start_noop

from ratelimitd.storage.embedded import die_with_parent


def start_checkout(name: str, root: Path, redis_url: str) -> Server:
    """``python -m ratelimitd serve`` from ``root`` (its directory first on sys.path: its code runs)."""
    port = procs.free_port()
    cmd = [sys.executable, "-m", "ratelimitd", "serve", "--listen", f"{procs.HOST}:{port}", "--redis-url", redis_url]
    env = {
        **os.environ,
        "RATELIMITD_OPERATOR_TOKEN": procs.OPERATOR_TOKEN,
        "RATELIMITD_LOG_LEVEL": "WARNING",
        "RATELIMITD_ENVOY_DOMAINS": "ratelimitd",
        "PYTHONPATH": str(root),
    }
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, cwd=root, preexec_fn=die_with_parent)
    server = Server(name, port, [proc])
    try:
        procs.wait_port(port, proc)
    except BaseException:
        server.stop()
        raise
    return server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, type=Path, help="another checkout of ratelimitd")
    ap.add_argument("--calls", type=int, default=6000, help="calls per round, per server and RPC")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rps", type=int, default=0, help="ghz: a fixed offered rate (0: as fast as it answers)")
    ap.add_argument("--rpc", default="both", help="check, envoy or both")
    ap.add_argument("--generator", choices=["auto", "python"], default="auto")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="bound of one round")
    args = ap.parse_args()
    if not (args.baseline / "ratelimitd" / "__main__.py").exists():
        ap.error(f"{args.baseline} is not a ratelimitd checkout")
    if not (0 < args.calls <= 2_000_000 and 0 < args.rounds <= 50 and 0 < args.concurrency <= 1024):
        ap.error("--calls in 1..2000000, --rounds in 1..50, --concurrency in 1..1024")
    rpcs = ["check", "envoy"] if args.rpc == "both" else args.rpc.split(",")
    if any(r not in ("check", "envoy") for r in rpcs):
        ap.error("--rpc takes check, envoy or both")
    load = Load(args.calls, args.concurrency, 4, args.max_seconds, args.rps)
    lifetime = (args.rounds * len(rpcs) * 3 + 3) * args.max_seconds + 60
    tmp = tempfile.TemporaryDirectory(prefix="ratelimitd-ab-")
    valkey = procs.Valkey()
    servers: list[Server] = []
    ghz = procs.find_ghz() if args.generator == "auto" else None
    gen: Ghz | PythonGenerator | None = None
    try:
        valkey.start()
        servers.append(start_checkout("baseline", args.baseline.resolve(), valkey.url))
        servers.append(start_checkout("new", procs.ROOT, valkey.url))
        servers.append(start_noop(1, lifetime))
        key = asyncio.run(setup(servers[1].address, procs.OPERATOR_TOKEN, 1))[0]
        gen = load_generator(ghz, tmp.name)
        print(f"generator: {gen.name}; baseline: {args.baseline}; new: {procs.ROOT}")
        warm = Load(500, args.concurrency, 4, args.max_seconds)
        for rpc in rpcs:
            for s in servers:
                gen.run(s.address, rpc, key, warm)
        results: dict[tuple[str, str], list[float]] = {}
        for n in range(args.rounds):
            order = servers[n % 3 :] + servers[: n % 3]
            for rpc in rpcs:
                for s in order:
                    r = run_round(s, valkey, gen, rpc, key, load)
                    results.setdefault((rpc, s.name), []).append(r["server_us"])
                    print(row(str(n + 1), rpc, s.name, r), flush=True)
        print("\nmedian server CPU per call [min..max] over rounds")
        medians = {k: statistics.median(v) for k, v in results.items()}
        for (rpc, name), per_round in results.items():
            spread = f"[{min(per_round):.1f}..{max(per_round):.1f}]"
            print(f"{RPCS[rpc]:<16} {name:<9} {medians[(rpc, name)]:8.1f} us  {spread}")
        print()
        for rpc in rpcs:
            noop = medians[(rpc, "no-op")]
            for name in ("baseline", "new"):
                us = medians[(rpc, name)]
                print(f"ratio {RPCS[rpc]} {name}: {us:.1f} / {noop:.1f} = {us / noop:.2f}x")
    finally:
        if gen is not None:
            gen.close()
        for s in servers:
            s.stop()
        valkey.stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
