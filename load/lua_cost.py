"""Valkey-side cost of the hot path: script time and commands per decision, inside Valkey.

    python load/lua_cost.py [--calls 3000]              # through the real server (gRPC), the default
    python load/lua_cost.py --direct [--calls 3000]     # the engine in-process, scripts called directly
    python load/lua_cost.py --profile [--calls 3000]    # decide.lua's CPU by section, and its floor
    python load/lua_cost.py --floor [--calls 3000]      # the floor, back to back and a round trip apart

Both modes start a private Valkey on a free loopback port (no AOF, no RDB) and
set up one organization with RPM/RPD/TPM/TPD limits for the model, one project
with RPM/TPM limits and one API key, all large enough that every call is
admitted (each decision still evaluates and charges all six buckets). Then, one
call at a time, ``--calls`` decisions with a token estimate of 500, and a usage
report for each admitted one.

With ``--spend-limit`` the project also has a price and a monthly spend limit
(never reached), so each decision also reads the month's spend and reserves
its estimated cost (issue 9, item 7).

``server`` mode (the default) runs ``python -m ratelimitd serve --redis-url``
and calls it over gRPC (CheckAndConsume, then ReportUsage): exactly what a
client's decision costs Valkey. ``--direct`` runs the engine in this process
(``Decider.check``, ``Usage.report``), the measurement this tool always made.

For each phase it resets Valkey's statistics (CONFIG RESETSTAT) and reads
``INFO commandstats`` afterwards:

- script usec per decision: the ``usec`` of every script entry (eval, evalsha,
  their _ro forms, fcall, fcall_ro) / decisions. Valkey's time in the script,
  including the commands the script calls;
- Valkey CPU per decision: utime+stime of the Valkey process (/proc), which
  adds reading, parsing and answering each call to the script time (10 ms
  ticks: use a few thousand calls);
- commands per decision: Valkey counts every command a script runs in
  ``commandstats`` too (checked at start-up by running a script that calls
  INCR three times; the line ``nested commands counted`` says what it found), so
  the calls of every other entry / decisions is the number of commands run per
  decision, by name in the breakdown. ``ping`` (the server's health probe) is
  left out.

This is what bounds decisions/s per Valkey core, whatever the number of
ratelimitd processes in front of it. Benchmarks only: no assertion on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lua_profile
import procs
from bench import MODEL

from ratelimitd.v1 import rate_limit_service_pb2_grpc, usage_pb2_grpc
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb

TOKENS = 500
SCRIPT_COMMANDS = {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"}
BACKGROUND_COMMANDS = {"ping", "config|resetstat"}  # the server's health probe; this tool's own reset


def commandstats(client: Any) -> dict[str, dict[str, float]]:
    """INFO commandstats as {command: {"calls": n, "usec": t}} (``cmdstat_`` prefix dropped)."""
    stats: dict[str, dict[str, Any]] = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): {"calls": float(v["calls"]), "usec": float(v["usec"])}
        for name, v in stats.items()
    }


def summarize(stats: dict[str, dict[str, float]], n: int) -> dict[str, Any]:
    scripts = {c: v for c, v in stats.items() if c in SCRIPT_COMMANDS}
    nested = {c: v for c, v in stats.items() if c not in SCRIPT_COMMANDS and c not in BACKGROUND_COMMANDS}
    return {
        "calls": n,
        "script_usec_per_call": round(sum(v["usec"] for v in scripts.values()) / n, 2),
        "scripts_per_call": round(sum(v["calls"] for v in scripts.values()) / n, 2),
        "commands_per_call": round(sum(v["calls"] for v in nested.values()) / n, 2),
        "commands": {
            c: round(v["calls"] / n, 2) for c, v in sorted(nested.items(), key=lambda kv: -kv[1]["calls"]) if v["calls"]
        },
    }


def cpu_us(valkey: procs.Valkey, since: float, calls: int) -> float:
    """Valkey's process CPU (utime+stime) per call since ``since``: scripts, parsing, network."""
    return round((procs.cpu_seconds(valkey.pid) - since) / calls * 1e6, 1)


def nested_commands_counted(client: Any) -> bool:
    """Whether this server counts the commands a script runs in INFO commandstats."""
    client.config_resetstat()
    client.eval("redis.call('INCR', KEYS[1]) redis.call('INCR', KEYS[1]) return redis.call('INCR', KEYS[1])", 1, "x")
    counted = commandstats(client).get("incr", {}).get("calls", 0) == 3
    client.delete("x")
    return counted


# -- through the real server -------------------------------------------------------


async def setup_key(address: str, spend_limit: bool = False) -> str:
    """Organization: RPM/RPD/TPM/TPD; project: RPM/TPM; one key. Returns its secret.
    ``spend_limit``: a price for the model and a (never reached) monthly spend limit on the
    project too, so each decision also checks the month's spend and reserves its estimate."""
    from ratelimitd.cli.client import Api

    api = Api(address, procs.OPERATOR_TOKEN)
    org_id = await procs.cost_organization(api, "cost", MODEL)
    project_id, secret = await procs.cost_project(api, org_id, "p", MODEL)
    if spend_limit:
        usage = usage_pb2_grpc.UsageServiceStub(api.channel)
        price = upb.Price(
            organization_id=org_id,
            model=MODEL,
            input_usd_micros_per_million=50_000,
            output_usd_micros_per_million=80_000,
        )
        await usage.SetPrice(upb.SetPriceRequest(price=price))
        await usage.SetSpendLimit(
            upb.SetSpendLimitRequest(organization_id=org_id, project_id=project_id, limit_usd_micros=10**15),
        )
    await api.channel.close()
    return secret


def measure_server(valkey: procs.Valkey, calls: int, spend_limit: bool = False) -> dict[str, Any]:
    port = procs.free_port()
    server = procs.start_ratelimitd(valkey.url, port)
    try:
        address = f"{procs.HOST}:{port}"
        key = asyncio.run(setup_key(address, spend_limit))
        r = valkey.client()
        with grpc.insecure_channel(address) as channel:
            stub = rate_limit_service_pb2_grpc.RateLimitServiceStub(channel)
            check = pb.CheckRequest(api_key=key, model=MODEL, tokens=TOKENS)
            for _ in range(20):  # scripts loaded, connections open
                warm = stub.CheckAndConsume(check)
            stub.ReportUsage(pb.ReportUsageRequest(api_key=key, request_id=warm.request_id, input_tokens=1))
            r.config_resetstat()
            cpu = procs.cpu_seconds(valkey.pid)
            request_ids, admitted = [], 0
            for _ in range(calls):
                reply = stub.CheckAndConsume(check)
                admitted += reply.allowed
                request_ids.append(reply.request_id)
            decide = summarize(commandstats(r), calls) | {
                "admitted": admitted,
                "valkey_cpu_us": cpu_us(valkey, cpu, calls),
            }
            r.config_resetstat()
            cpu = procs.cpu_seconds(valkey.pid)
            for i, request_id in enumerate(request_ids):
                stub.ReportUsage(
                    pb.ReportUsageRequest(
                        api_key=key, request_id=request_id, input_tokens=300 + i % 200, output_tokens=150,
                        cached_tokens=i % 100, status_code=200, latency_ms=10,
                    )
                )  # fmt: skip
            report = summarize(commandstats(r), calls) | {"valkey_cpu_us": cpu_us(valkey, cpu, calls)}
        mode = "server (gRPC, one call at a time)" + (", with a spend limit" if spend_limit else "")
        return {"mode": mode, "decide": decide, "report": report}
    finally:
        procs.stop(server)


# -- the engine in this process (the original measurement) ---------------------------


async def captured_decision(app: Any, caller: Any) -> tuple[Any, list[str], list[str]]:
    """One real decision's script (a LuaScript), KEYS and ARGV (for --profile)."""
    connection = app.decider._connection
    seen: dict[str, Any] = {}
    run_script = connection.run_script

    async def keep(script: Any, keys: list[str], args: list[str]) -> Any:
        seen.update(script=script, keys=[str(k) for k in keys], args=[str(a) for a in args])
        return await run_script(script, keys, args)

    connection.run_script = keep
    try:
        await app.decider.check(caller, MODEL, 1, TOKENS)
    finally:
        connection.run_script = run_script
    return seen["script"], seen["keys"], seen["args"]


async def measure_direct(valkey: procs.Valkey, calls: int, profile: str = "") -> dict[str, Any]:
    from ratelimitd.app import App
    from ratelimitd.engine import ids
    from ratelimitd.engine.decisions import Caller
    from ratelimitd.settings import Settings

    app = App(Settings.load(env={}, listen="127.0.0.1:0", redis_url=valkey.url, operator_token="rlt_cost"))
    await app.start()
    try:
        c = app.control
        org = await c.create_organization("cost")
        dims = [("requests", "minute"), ("requests", "day"), ("tokens", "minute"), ("tokens", "day")]
        await c.set_organization_limits(org.id, [(MODEL, m, w, procs.BIG, False) for m, w in dims], [])
        project = await c.create_project(org.id, "p")
        await c.set_project_limits(
            org.id,
            project.id,
            [(MODEL, "requests", "minute", procs.BIG, False), (MODEL, "tokens", "minute", procs.BIG, False)],
            [],
        )
        _, secret = await c.create_api_key(org.id, project.id, "k")
        parsed = ids.parse_api_key(secret)
        assert parsed is not None
        caller = Caller(parsed.org_id, parsed.key_id, parsed.hash, "")
        r = valkey.client()
        warm = await app.decider.check(caller, MODEL, 1, TOKENS)  # scripts loaded
        await app.usage.report(caller, warm.request_id, "", 1, 0, 0, 200, 10)
        if profile:
            script, keys, args = await captured_decision(app, caller)
            measure = lua_profile.floor if profile == "floor" else lua_profile.profile
            return {"mode": profile, profile: measure(r, script, keys, args, calls)}
        r.config_resetstat()
        cpu = procs.cpu_seconds(valkey.pid)
        request_ids = [(await app.decider.check(caller, MODEL, 1, TOKENS)).request_id for _ in range(calls)]
        decide = summarize(commandstats(r), calls) | {"valkey_cpu_us": cpu_us(valkey, cpu, calls)}
        r.config_resetstat()
        cpu = procs.cpu_seconds(valkey.pid)
        for i, request_id in enumerate(request_ids):  # the same reports as through the server
            await app.usage.report(caller, request_id, "", 300 + i % 200, 150, i % 100, 200, 10)
        report = summarize(commandstats(r), calls) | {"valkey_cpu_us": cpu_us(valkey, cpu, calls)}
        return {"mode": "direct (engine in-process)", "decide": decide, "report": report}
    finally:
        await app.stop(0)


def show(result: dict[str, Any]) -> None:
    if "profile" in result:
        lua_profile.show(result["profile"])
        return
    if "floor" in result:
        lua_profile.show_floor(result["floor"])
        return
    print(f"mode: {result['mode']}; nested commands counted: {result['nested_commands_counted']}")
    head = f"{'phase':<8} {'calls':>6} {'script_us/call':>14} {'valkey_cpu_us':>13} {'scripts/call':>12}"
    print(f"{head} {'commands/call':>13}  breakdown")
    for phase in ("decide", "report"):
        s = result[phase]
        breakdown = " ".join(f"{c}={n:g}" for c, n in s["commands"].items())
        print(
            f"{phase:<8} {s['calls']:>6} {s['script_usec_per_call']:>14.2f} {s['valkey_cpu_us']:>13.1f} "
            f"{s['scripts_per_call']:>12.2f} "
            f"{s['commands_per_call']:>13.2f}  {breakdown}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000, help="decisions (and as many reports), one at a time")
    ap.add_argument("--direct", action="store_true", help="the engine in this process instead of the server")
    ap.add_argument(
        "--spend-limit", action="store_true", help="the project also has a price and a spend limit (server mode)"
    )
    ap.add_argument(
        "--profile", action="store_true", help="decide.lua's CPU by section in Valkey, and its floor (lua_profile.py)"
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="an empty function, the floor and decide, back to back and one round trip apart (lua_profile.py)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 0 < args.calls <= 1_000_000:
        ap.error("--calls must be in 1..1000000")
    valkey = procs.Valkey().start()
    try:
        counted = nested_commands_counted(valkey.client())
        if args.direct or args.profile or args.floor:
            profile = "profile" if args.profile else "floor" if args.floor else ""
            result = asyncio.run(measure_direct(valkey, args.calls, profile))
        else:
            result = measure_server(valkey, args.calls, args.spend_limit)
        result["nested_commands_counted"] = counted
    finally:
        valkey.stop()
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
