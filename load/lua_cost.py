"""Server-side cost of the hot path's scripts: microseconds per call inside Valkey.

    python load/lua_cost.py [--calls 3000]

Starts a private Valkey on a free loopback port, runs ``--calls`` decisions
(4 windows, organization and project buckets) and as many usage reports, one at a
time, and prints Valkey's own ``usec_per_call`` for each script (INFO
commandstats). This is what bounds decisions/s per Valkey core, whatever the
number of ratelimitd processes in front of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratelimitd.app import App  # noqa: E402
from ratelimitd.engine import ids  # noqa: E402
from ratelimitd.engine.decisions import Caller  # noqa: E402
from ratelimitd.settings import Settings  # noqa: E402
from ratelimitd.storage.embedded import find_server_binary  # noqa: E402
from tests.servers import free_port  # noqa: E402

BIG = 10**11


async def measure(url: str, port: int, calls: int) -> dict[str, float]:
    app = App(Settings.load(env={}, listen="127.0.0.1:0", redis_url=url, operator_token="rlt_cost"))
    await app.start()
    try:
        c = app.control
        org = await c.create_organization("cost")
        dims = [("requests", "minute"), ("requests", "day"), ("tokens", "minute"), ("tokens", "day")]
        await c.set_organization_limits(org.id, [("m", m, w, BIG) for m, w in dims], [])
        project = await c.create_project(org.id, "p")
        await c.set_project_limits(
            org.id, project.id, [("m", "requests", "minute", BIG), ("m", "tokens", "minute", BIG)], []
        )
        _, secret = await c.create_api_key(org.id, project.id, "k")
        parsed = ids.parse_api_key(secret)
        assert parsed is not None
        caller = Caller(parsed.org_id, parsed.key_id, parsed.hash, "")
        r = redis.Redis(port=port)
        await app.decider.check(caller, "m", 1, 500)  # scripts loaded
        r.config_resetstat()
        request_ids = [(await app.decider.check(caller, "m", 1, 500)).request_id for _ in range(calls)]
        decide = r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
        r.config_resetstat()
        for request_id in request_ids:
            await app.usage.report(caller, request_id, "", 300, 150, 0, 200, 10)
        report = r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
        return {"calls": calls, "decide_usec_per_call": decide, "report_usec_per_call": report}
    finally:
        await app.stop(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [find_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = redis.Redis(port=port)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.02)
            print(json.dumps(asyncio.run(measure(f"redis://127.0.0.1:{port}/0", port, args.calls))))
        finally:
            server.terminate()
            server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
