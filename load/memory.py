"""Valkey memory per active project, per active (project, model, key) and per request record.

    python load/memory.py [--projects 40] [--minutes 120] [--calls-per-minute 2]

Measured through the API, on a private Valkey (no AOF, no RDB) and a real
ratelimitd started with ``--manual-clock`` (the time is the key ``rl:clock``,
microseconds, as in the tests): one organization with RPM/RPD/TPM/TPD limits,
``--projects`` projects with RPM/TPM limits and one API key each. Then, for
``--minutes`` simulated minutes (default 2 hours), every key makes
``--calls-per-minute`` decisions (CheckAndConsume, 500-token estimate) each
followed by its ReportUsage, and the clock moves on a minute. So every
(project, model, key) is active every minute, the case that costs most.

It reports ``INFO memory`` used_memory after set-up and after the load, and
``MEMORY USAGE`` (exact: SAMPLES 0) of every key, grouped by what the key is
(ratelimitd/core/keys.py names them), then works out:

- configuration per project (records, limits, key, indexes);
- live state per active project (its share of the organization's decision state
  hash, its request log);
- usage counters per active (project, model, key): the bytes each minute, hour
  and day bucket holds for one of them, times the number of such buckets kept
  over the retention (ratelimitd/core/retention.py; the server's defaults);
- a request record (replay and reservation), kept ``request_ttl_s``.

The usage buckets are one hash per organization and time bucket, with fields per
(project, model, key): how many share one hash changes its encoding (listpack
up to hash-max-listpack-entries fields, a hashtable above), so the bytes per key
depend on --projects; the encoding is printed. Request records expire in real
time (PX), buckets too; usage counters expire at times from the manual clock,
which starts on the current hour. Bounded: --minutes <= 10080, --projects <= 2000.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
from bench import MODEL

from ratelimitd.cli.client import Api
from ratelimitd.core import keys
from ratelimitd.settings import Settings
from ratelimitd.v1 import rate_limit_service_pb2_grpc, usage_pb2_grpc
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb

TOKENS = 500
# A key's kind: its part after "rl:{org}:" with ids and numbers replaced by "*".
_ID = re.compile(r"^(org|proj|key|req|mem|cred)_[0-9A-Za-z_-]+$|^[0-9]+$|^[0-9A-Za-z_-]{16,}$")


def kind(key: str) -> str:
    m = re.match(r"^rl:\{[^}]*\}:(.*)$", key)
    if not m:
        return key if key in (keys.ORGANIZATIONS, keys.CREDENTIALS, keys.MANUAL_CLOCK) else re.sub(r"\d+", "*", key)
    parts = m.group(1).split(":")
    return ":".join("*" if _ID.match(p) or p == MODEL else p for p in parts)


async def setup(address: str, projects: int, measure: Any) -> tuple[list[str], int, int]:
    """The organization, then the projects; returns the keys and used_memory before and after the projects."""
    api = Api(address, procs.OPERATOR_TOKEN)
    org_id = await procs.cost_organization(api, "memory", MODEL)
    prices = usage_pb2_grpc.UsageServiceStub(api.channel)  # spend is counted too
    await prices.SetPrice(
        upb.SetPriceRequest(
            price=upb.Price(
                organization_id=org_id,
                model=MODEL,
                input_usd_micros_per_million=50_000,
                output_usd_micros_per_million=80_000,
            )
        ),
    )
    secrets = []
    before = measure()
    for i in range(projects):
        secrets.append((await procs.cost_project(api, org_id, f"p{i}", MODEL))[1])
    after = measure()
    await api.channel.close()
    return secrets, before, after


async def drive(address: str, valkey: Any, secrets: list[str], minutes: int, per_minute: int, start_s: int) -> int:
    """Every key active every simulated minute; returns the number of decisions (all reported)."""
    decisions = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rate_limit_service_pb2_grpc.RateLimitServiceStub(channel)

        async def one(secret: str, n: int) -> None:
            reply = await stub.CheckAndConsume(pb.CheckRequest(api_key=secret, model=MODEL, tokens=TOKENS))
            if not reply.allowed:
                raise RuntimeError(f"refused: {reply.message}")
            await stub.ReportUsage(
                pb.ReportUsageRequest(
                    api_key=secret, request_id=reply.request_id, input_tokens=300 + n % 200, output_tokens=150,
                    cached_tokens=n % 100, status_code=200, latency_ms=10,
                )
            )  # fmt: skip

        for minute in range(minutes):
            await valkey.set(keys.MANUAL_CLOCK, (start_s + 60 * minute + 1) * 1_000_000)
            for n in range(per_minute):
                await asyncio.gather(*(one(s, minute * per_minute + n) for s in secrets))
                decisions += len(secrets)
            if minute % 30 == 29:
                print(f"  simulated minute {minute + 1}/{minutes}", flush=True)
    return decisions


def scan_usage(client: Any) -> dict[str, list[tuple[str, int]]]:
    """Every key grouped by kind, with its MEMORY USAGE (exact)."""
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for raw in client.scan_iter(count=1000):
        key = raw.decode()
        usage = client.memory_usage(key, samples=0) or 0
        groups[kind(key)].append((key, int(usage)))
    return groups


def used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--projects", type=int, default=40, help="projects, one API key each")
    ap.add_argument("--minutes", type=int, default=120, help="simulated minutes of load")
    ap.add_argument("--calls-per-minute", type=int, default=2, help="decisions (+ reports) per key per minute")
    args = ap.parse_args()
    if not 0 < args.projects <= 2000 or not 0 < args.minutes <= 10080 or not 0 < args.calls_per_minute <= 1000:
        ap.error("--projects 1..2000, --minutes 1..10080, --calls-per-minute 1..1000")
    retention = Settings.load(env={}).retention
    valkey = procs.Valkey().start()
    server = None
    try:
        client = valkey.client()
        start_s = int(time.time() // 3600 * 3600)  # on a whole hour, near real time (as tests/conftest.py Clock)
        client.set(keys.MANUAL_CLOCK, start_s * 1_000_000)
        port = procs.free_port()
        # the rollup of finished minutes into hours and days runs every second here
        server = procs.start_ratelimitd(
            valkey.url, port, manual_clock=True, extra_env={"RATELIMITD_USAGE_ROLLUP_INTERVAL_S": "1"}
        )
        address = f"{procs.HOST}:{port}"
        empty = used_memory(client)
        secrets, before, after = asyncio.run(setup(address, args.projects, lambda: used_memory(client)))
        configured = used_memory(client)
        config_groups = scan_usage(client)
        print(f"set-up: {args.projects} projects; driving {args.minutes} simulated minutes ...", flush=True)
        import redis.asyncio

        async def run() -> int:
            aclient = redis.asyncio.Redis(host=procs.HOST, port=valkey.port)
            try:
                return await drive(address, aclient, secrets, args.minutes, args.calls_per_minute, start_s)
            finally:
                await aclient.aclose()

        decisions = asyncio.run(run())
        time.sleep(3)  # the last finished minutes rolled up
        loaded = used_memory(client)
        groups = scan_usage(client)
        encodings = {k: client.object("encoding", members[0][0]).decode() for k, members in groups.items() if members}
        listpack = client.config_get("hash-max-listpack-entries").get("hash-max-listpack-entries", "?")
        print(f"hash-max-listpack-entries: {listpack} (a usage bucket holds 1-2 fields per active key)")
        report(args, retention, (empty, before, after, configured, loaded), config_groups, groups, encodings, decisions)
    finally:
        procs.stop(server)
        valkey.stop()
    return 0


def report(
    args: argparse.Namespace,
    retention: Any,
    memory: tuple[int, int, int, int, int],
    config_groups: dict[str, list[tuple[str, int]]],
    groups: dict[str, list[tuple[str, int]]],
    encodings: dict[str, str],
    decisions: int,
) -> None:
    n = args.projects
    empty, before, after, configured, loaded = memory
    print()
    print(f"decisions (each reported): {decisions}; simulated minutes: {args.minutes}; projects/keys: {n}")
    print(f"used_memory: empty {human(empty)}, after set-up {human(configured)} (+{human(configured - empty)}), ")
    print(f"             after load {human(loaded)} (+{human(loaded - configured)})")
    print()
    print(f"{'key kind':<24} {'keys':>6} {'bytes total':>12} {'bytes/key':>10} {'encoding':<10}")
    for k, members in sorted(groups.items(), key=lambda kv: -sum(u for _, u in kv[1])):
        size = sum(u for _, u in members)
        print(f"{k:<24} {len(members):>6} {size:>12,} {size / len(members):>10,.0f} {encodings.get(k, ''):<10}")

    def total(g: dict[str, list[tuple[str, int]]], prefixes: tuple[str, ...]) -> int:
        return sum(u for k, members in g.items() if k.startswith(prefixes) for _, u in members)

    per_project_kinds = ("p:", "lim:p:", "pk:", "k:")
    config_per_project = total(config_groups, per_project_kinds) / n
    # the decision state hash ("s": every bucket, and each project's cached configuration) is one
    # per organization, shared by its projects
    live_per_project = (total(groups, ("log:",)) + sum(u for _, u in groups.get("s", []))) / n
    log_bytes = total(groups, ("log:",)) / n
    log_entries = min(retention.log_entries, decisions // n)  # one entry per report
    print()
    print("per project")
    print(f"  configuration (p, lim:p, pk, k keys):          {human(config_per_project)}")
    print(f"    used_memory delta while creating them / {n}:  {human((after - before) / n)} (with audit events)")
    print(f"  live state (buckets and config in s, log):     {human(live_per_project)}")
    print(f"    of which the request log ({log_entries} entries): {human(log_bytes)}")
    if log_entries:
        entry = log_bytes / log_entries
        full = entry * retention.log_entries
        print(f"    log entry ~{human(entry)}; a full log ({retention.log_entries} entries): {human(full)}")
        busy = config_per_project + live_per_project - log_bytes + full
        print(f"  an active project with a full request log:    {human(busy)}")

    print()
    print("usage counters per active (project, model, key), active every minute")
    over_retention = 0.0
    for res, seconds, kept_s in [
        ("m", 60, retention.minute_s),
        ("h", 3600, retention.hour_s),
        ("d", 86400, retention.day_s),
    ]:
        members = groups.get(f"u:{res}:*", [])
        if not members:
            continue
        # Only whole buckets: the first and last may hold part of their time.
        sizes = sorted(u for _, u in members)
        per_key = statistics.median(sizes) / n
        kept = kept_s // seconds + 2  # a bucket lives its own length, then the retention
        over_retention += per_key * kept
        print(
            f"  {res}: {len(members)} buckets, median {human(statistics.median(sizes))} each "
            f"({encodings.get(f'u:{res}:*', '?')}), {human(per_key)} per key x {kept} kept = {human(per_key * kept)}"
        )
    ids = sum(u for _, u in groups.get("ui", [])) / n
    over_retention += ids
    print(f"  its usage id (ui hash, kept while the project exists): {human(ids)}")
    print(f"  over the whole retention: {human(over_retention)} per active (project, model, key)")
    records = groups.get("r:*", [])
    if records:
        rec = statistics.fmean(u for _, u in records)
        print()
        print(f"request record: {human(rec)} each, kept {retention.request_ttl_s} s "
              f"(at 1,000 decisions/s: {human(rec * 1000 * retention.request_ttl_s)} live)")  # fmt: skip
    print()
    print(f"used_memory growth per decision+report during the load: {human((loaded - configured) / max(1, decisions))}")


if __name__ == "__main__":
    raise SystemExit(main())
