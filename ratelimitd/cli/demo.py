"""``demo``: the reference's worked example (org 100/min; prod 80, staging 30, dev inheriting).

Without ``--address`` it runs a private server on an embedded Valkey in a
temporary directory; with one, it runs against that server and afterwards
deletes the projects (and so the keys) it made and clears its organizations'
limits. The organizations themselves stay, empty: the API has no call that
deletes an organization.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ratelimitd.cli.client import Api
from ratelimitd.cli.command import DEFAULT_ADDRESS, SubParsers, client_flags, run_async, with_api
from ratelimitd.cli.limits import parse_limit_args
from ratelimitd.cli.output import render
from ratelimitd.core.keys import MANUAL_CLOCK
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb

DEMO_MODEL = "llama-3.3-70b-versatile"
PROJECTS = (("myapp-prod", 80), ("myapp-staging", 30), ("myapp-dev", None))


async def _burst(api: Api, secret: str, n: int) -> tuple[int, int, int]:
    """n concurrent requests; (admitted, refused by project, refused by organization)."""
    req = pb.CheckRequest(api_key=secret, model=DEMO_MODEL)
    replies = await asyncio.gather(*(api.decisions.CheckAndConsume(req) for _ in range(n)))
    return (
        sum(r.allowed for r in replies),
        sum(r.reason == pb.REASON_PROJECT_LIMIT for r in replies),
        sum(r.reason == pb.REASON_ORGANIZATION_LIMIT for r in replies),
    )


@dataclass
class DemoRun:
    """What one run made, so that it can take it down again."""

    api: Api
    made: dict[str, list[str]] = field(default_factory=dict)  # project ids by organization id

    async def org(self, label: str) -> dict[str, str]:
        """A fresh organization with the reference's limits; API key secrets by project name."""
        org = await self.api.orgs.CreateOrganization(apb.CreateOrganizationRequest(name=f"demo: {label}"))
        self.made[org.id] = []
        limit = parse_limit_args(DEMO_MODEL, ["rpm=100"])
        await self.api.orgs.SetOrganizationLimits(apb.SetOrganizationLimitsRequest(organization_id=org.id, set=limit))
        secrets = {}
        for name, custom in PROJECTS:
            p = await self.api.projects.CreateProject(apb.CreateProjectRequest(organization_id=org.id, name=name))
            self.made[org.id].append(p.id)
            if custom is not None:
                own = parse_limit_args(DEMO_MODEL, [f"rpm={custom}"])
                await self.api.projects.SetProjectLimits(
                    apb.SetProjectLimitsRequest(organization_id=org.id, project_id=p.id, set=own)
                )
            key = await self.api.projects.CreateApiKey(
                apb.CreateApiKeyRequest(organization_id=org.id, project_id=p.id, name="demo")
            )
            secrets[name] = key.secret
        return secrets

    async def clean_up(self) -> str:
        for org_id, projects in self.made.items():
            for project_id in projects:
                await self.api.projects.DeleteProject(
                    apb.DeleteProjectRequest(organization_id=org_id, project_id=project_id)
                )
            clear = [apb.LimitKey(model=DEMO_MODEL, metric="requests", window="minute")]
            await self.api.orgs.SetOrganizationLimits(
                apb.SetOrganizationLimitsRequest(organization_id=org_id, clear=clear)
            )
        n = len(self.made)
        return (
            f"cleaned up: deleted the demo's projects and their API keys, and cleared the limits of its {n} "
            f"organizations ({', '.join(self.made)}); they stay, empty, as the API cannot delete an organization"
        )


async def run_demo(run: DemoRun, out: Callable[[str], None]) -> None:
    out(f"Organization limit: 100 requests/minute on {DEMO_MODEL}")
    out("  myapp-prod 80/min (custom)   myapp-staging 30/min (custom)   myapp-dev inherits 100/min")
    out("Each scenario starts from full buckets (a fresh organization); requests are sent at once.\n")
    api = run.api
    rows: list[tuple[str, str, int, int, int, int]] = []

    for name, _ in PROJECTS:
        keys = await run.org(f"{name} alone")
        ok, by_project, by_org = await _burst(api, keys[name], 120)
        rows.append((f"{name} alone", name, 120, ok, by_project, by_org))

    keys = await run.org("shared ceiling")
    for name, n in (("myapp-prod", 80), ("myapp-staging", 15), ("myapp-dev", 20)):
        ok, by_project, by_org = await _burst(api, keys[name], n)
        rows.append(("prod 80, staging 15, then dev", name, n, ok, by_project, by_org))

    keys = await run.org("110 at once")
    (p_ok, p_proj, p_org), (s_ok, s_proj, s_org) = await asyncio.gather(
        _burst(api, keys["myapp-prod"], 80), _burst(api, keys["myapp-staging"], 30)
    )
    rows.append(("prod + staging together", "myapp-prod", 80, p_ok, p_proj, p_org))
    rows.append(("prod + staging together", "myapp-staging", 30, s_ok, s_proj, s_org))
    out(render(rows, ("SCENARIO", "PROJECT", "SENT", "ADMITTED", "REFUSED:PROJECT", "REFUSED:ORG")))
    out(f"\nprod + staging admitted {p_ok + s_ok} of 110: the organization's 100/min is a hard ceiling.")


async def on_server(api: Api) -> int:
    run = DemoRun(api)
    try:
        await run_demo(run, print)
    finally:
        print(f"\n{await run.clean_up()}")
    return 0


async def on_private_server() -> int:
    # imported here: only this path starts a server, and the client verbs need none of it
    from ratelimitd.app import App
    from ratelimitd.settings import Settings

    with tempfile.TemporaryDirectory(prefix="ratelimitd-demo-") as tmp:
        token = "rlt_demo"
        # A stopped clock: the buckets drain with time, so on a slow or busy machine a burst
        # that takes a second would see an extra request admitted, and the demo would not
        # show the reference's exact numbers. (A server given with --address runs on real time.)
        app = App(Settings.load(listen="127.0.0.1:0", data_dir=Path(tmp), operator_token=token, manual_clock=True))
        await app.start()
        await app.redis.set(MANUAL_CLOCK, time.time_ns() // 1000)
        print(f"(a private ratelimitd on 127.0.0.1:{app.port} with an embedded Valkey; pass --address to use yours)\n")
        try:
            local = Api(f"127.0.0.1:{app.port}", token)
            await run_demo(DemoRun(local), print)
            await local.channel.close()
        finally:
            await app.stop(0)
    return 0


def demo(args: argparse.Namespace) -> int:
    if not args.address:
        return run_async(on_private_server())
    return run_async(with_api(args, on_server))


def add_parsers(sub: SubParsers) -> None:
    p = client_flags(
        sub.add_parser(
            "demo",
            help="run the reference's worked example (org 100/min; prod 80, staging 30)",
            description="Run the reference's worked example. Without --address (or RATELIMITD_ADDRESS) on a "
            f"private server; with one (e.g. {DEFAULT_ADDRESS}) on that server, cleaning up afterwards.",
        )
    )
    p.set_defaults(func=demo)
