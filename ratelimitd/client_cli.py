"""Client verbs of the CLI, all over the gRPC API: demo, check, and management.

The address and credential come from flags or RATELIMITD_ADDRESS and
RATELIMITD_TOKEN. Errors end in one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import admin_pb2_grpc, ratelimit_pb2_grpc
from ratelimitd.v1 import ratelimit_pb2 as pb

DEFAULT_ADDRESS = "127.0.0.1:50051"
SHORTHANDS = {
    "rpm": ("requests", "minute"),
    "rpd": ("requests", "day"),
    "tpm": ("tokens", "minute"),
    "tpd": ("tokens", "day"),
}


class Api:
    def __init__(self, address: str, token: str | None) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.decisions: ratelimit_pb2_grpc.RateLimitServiceAsyncStub = ratelimit_pb2_grpc.RateLimitServiceStub(
            self.channel
        )
        self.orgs: admin_pb2_grpc.OrganizationServiceAsyncStub = admin_pb2_grpc.OrganizationServiceStub(self.channel)
        self.projects: admin_pb2_grpc.ProjectServiceAsyncStub = admin_pb2_grpc.ProjectServiceStub(self.channel)


def parse_limit_args(model: str, items: Sequence[str]) -> list[apb.Limit]:
    """``rpm=100`` or ``requests/minute=100`` (any configured window) for one model."""
    limits = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise ValueError(f"limit {item!r} is not NAME=NUMBER (e.g. rpm=100 or tokens/day=500000)")
        if name in SHORTHANDS:
            metric, window = SHORTHANDS[name]
        elif "/" in name:
            metric, window = name.split("/", 1)
        else:
            raise ValueError(f"limit {name!r} is not one of {', '.join(SHORTHANDS)} or METRIC/WINDOW")
        limits.append(apb.Limit(model=model, metric=metric, window=window, limit=int(value)))
    return limits


def parse_clear_args(model: str, items: Sequence[str]) -> list[apb.LimitKey]:
    keys = []
    for name in items:
        if name in SHORTHANDS:
            metric, window = SHORTHANDS[name]
        elif "/" in name:
            metric, window = name.split("/", 1)
        else:
            raise ValueError(f"limit {name!r} is not one of {', '.join(SHORTHANDS)} or METRIC/WINDOW")
        keys.append(apb.LimitKey(model=model, metric=metric, window=window))
    return keys


def emit(args: argparse.Namespace, message: Message, table: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))
    else:
        print(table())


def render(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _opt(msg: Message, field: str) -> str:
    return str(getattr(msg, field)) if msg.HasField(field) else "-"


def limits_table(limits: Sequence[apb.Limit]) -> str:
    return render([(x.model, x.metric, x.window, x.limit) for x in limits], ("MODEL", "METRIC", "WINDOW", "LIMIT"))


def project_limits_table(reply: apb.ProjectLimits) -> str:
    rows = [
        (e.model, e.metric, e.window, _opt(e, "custom"), _opt(e, "organization"), e.effective) for e in reply.effective
    ]
    return render(rows, ("MODEL", "METRIC", "WINDOW", "PROJECT", "ORGANIZATION (CEILING)", "EFFECTIVE"))


def decision_text(reply: pb.CheckResponse) -> str:
    verdict = "ALLOWED" if reply.allowed else f"REFUSED ({pb.Reason.Name(reply.reason)})"
    lines = [verdict]
    if reply.message:
        lines.append(reply.message)
    rows = [
        (pb.Scope.Name(b.scope).removeprefix("SCOPE_").lower(), b.metric, b.window, b.limit, b.remaining,
         f"{b.reset_after_ms}ms")
        for b in reply.buckets
    ]  # fmt: skip
    if rows:
        lines += ["", render(rows, ("SCOPE", "METRIC", "WINDOW", "LIMIT", "REMAINING", "RESET"))]
    if reply.headers:
        lines += ["", *(f"{k}: {v}" for k, v in sorted(reply.headers.items()))]
    lines += ["", f"request id: {reply.request_id}"]
    return "\n".join(lines)


# -- verbs -----------------------------------------------------------------


async def check(api: Api, args: argparse.Namespace) -> int:
    reply = await api.decisions.CheckAndConsume(
        pb.CheckRequest(
            api_key=args.api_key, model=args.model, requests=args.requests, tokens=args.tokens,
            request_id=args.request_id or "",
        )
    )  # fmt: skip
    emit(args, reply, lambda: decision_text(reply))
    return 0 if reply.allowed else 3


async def org_create(api: Api, args: argparse.Namespace) -> int:
    org = await api.orgs.CreateOrganization(apb.CreateOrganizationRequest(name=args.name), metadata=api.metadata)
    emit(args, org, lambda: render([(org.id, org.name)], ("ID", "NAME")))
    return 0


async def org_limits(api: Api, args: argparse.Namespace) -> int:
    if args.set or args.clear:
        reply = await api.orgs.SetOrganizationLimits(
            apb.SetOrganizationLimitsRequest(
                organization_id=args.org,
                set=parse_limit_args(args.model, args.set),
                clear=parse_clear_args(args.model, args.clear),
            ),
            metadata=api.metadata,
        )
    else:
        reply = await api.orgs.GetOrganizationLimits(
            apb.GetOrganizationLimitsRequest(organization_id=args.org), metadata=api.metadata
        )
    emit(args, reply, lambda: limits_table(reply.limits))
    return 0


async def project_create(api: Api, args: argparse.Namespace) -> int:
    p = await api.projects.CreateProject(
        apb.CreateProjectRequest(organization_id=args.org, name=args.name, description=args.description),
        metadata=api.metadata,
    )
    emit(args, p, lambda: render([(p.id, p.name, p.description)], ("ID", "NAME", "DESCRIPTION")))
    return 0


async def project_limits(api: Api, args: argparse.Namespace) -> int:
    if args.set or args.clear:
        reply = await api.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(
                organization_id=args.org,
                project_id=args.project,
                set=parse_limit_args(args.model, args.set),
                clear=parse_clear_args(args.model, args.clear),
            ),
            metadata=api.metadata,
        )
    else:
        reply = await api.projects.GetProjectLimits(
            apb.GetProjectLimitsRequest(organization_id=args.org, project_id=args.project), metadata=api.metadata
        )
    emit(args, reply, lambda: project_limits_table(reply))
    return 0


async def key_create(api: Api, args: argparse.Namespace) -> int:
    reply = await api.projects.CreateApiKey(
        apb.CreateApiKeyRequest(organization_id=args.org, project_id=args.project, name=args.name),
        metadata=api.metadata,
    )
    emit(
        args,
        reply,
        lambda: f"{reply.secret}\n\nkey id {reply.key.id}; the secret above is shown only now, keep it safe.",
    )
    return 0


def keys_table(keys: Sequence[apb.ApiKey]) -> str:
    return render(
        [(k.id, k.name, k.prefix + "…", k.created_at_ms, k.last_used_at_ms or "-", "revoked" if k.revoked else "active")
         for k in keys],
        ("ID", "NAME", "PREFIX", "CREATED_MS", "LAST_USED_MS", "STATE"),
    )  # fmt: skip


async def key_list(api: Api, args: argparse.Namespace) -> int:
    reply = await api.projects.ListApiKeys(
        apb.ListApiKeysRequest(organization_id=args.org, project_id=args.project), metadata=api.metadata
    )
    emit(args, reply, lambda: keys_table(reply.keys))
    return 0


async def key_revoke(api: Api, args: argparse.Namespace) -> int:
    reply = await api.projects.RevokeApiKey(
        apb.RevokeApiKeyRequest(organization_id=args.org, key_id=args.key), metadata=api.metadata
    )
    emit(args, reply, lambda: keys_table([reply]))
    return 0


async def health(api: Api, args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = await health_pb2_grpc.HealthStub(api.channel).Check(
        health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
    )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


# -- demo --------------------------------------------------------------------

DEMO_MODEL = "llama-3.3-70b-versatile"


async def _burst(api: Api, secret: str, n: int) -> tuple[int, int, int]:
    """n concurrent requests; (admitted, refused by project, refused by organization)."""
    req = pb.CheckRequest(api_key=secret, model=DEMO_MODEL)
    replies = await asyncio.gather(*(api.decisions.CheckAndConsume(req) for _ in range(n)))
    return (
        sum(r.allowed for r in replies),
        sum(r.reason == pb.REASON_PROJECT_LIMIT for r in replies),
        sum(r.reason == pb.REASON_ORGANIZATION_LIMIT for r in replies),
    )


async def _demo_org(api: Api, label: str) -> dict[str, str]:
    md = api.metadata
    org = await api.orgs.CreateOrganization(apb.CreateOrganizationRequest(name=f"demo: {label}"), metadata=md)
    await api.orgs.SetOrganizationLimits(
        apb.SetOrganizationLimitsRequest(organization_id=org.id, set=parse_limit_args(DEMO_MODEL, ["rpm=100"])),
        metadata=md,
    )
    secrets = {}
    for name, custom in (("myapp-prod", 80), ("myapp-staging", 30), ("myapp-dev", None)):
        p = await api.projects.CreateProject(apb.CreateProjectRequest(organization_id=org.id, name=name), metadata=md)
        if custom is not None:
            await api.projects.SetProjectLimits(
                apb.SetProjectLimitsRequest(
                    organization_id=org.id, project_id=p.id, set=parse_limit_args(DEMO_MODEL, [f"rpm={custom}"])
                ),
                metadata=md,
            )
        key = await api.projects.CreateApiKey(
            apb.CreateApiKeyRequest(organization_id=org.id, project_id=p.id, name="demo"), metadata=md
        )
        secrets[name] = key.secret
    return secrets


async def run_demo(api: Api, out: Callable[[str], None]) -> None:
    out(f"Organization limit: 100 requests/minute on {DEMO_MODEL}")
    out("  myapp-prod 80/min (custom)   myapp-staging 30/min (custom)   myapp-dev inherits 100/min")
    out("Each scenario starts from full buckets (a fresh organization); requests are sent at once.\n")
    rows: list[tuple[str, str, int, int, int, int]] = []

    for name in ("myapp-prod", "myapp-staging", "myapp-dev"):
        keys = await _demo_org(api, f"{name} alone")
        ok, by_project, by_org = await _burst(api, keys[name], 120)
        rows.append((f"{name} alone", name, 120, ok, by_project, by_org))

    keys = await _demo_org(api, "shared ceiling")
    for name, n in (("myapp-prod", 80), ("myapp-staging", 15), ("myapp-dev", 20)):
        ok, by_project, by_org = await _burst(api, keys[name], n)
        rows.append(("prod 80, staging 15, then dev", name, n, ok, by_project, by_org))

    keys = await _demo_org(api, "110 at once")
    (p_ok, p_proj, p_org), (s_ok, s_proj, s_org) = await asyncio.gather(
        _burst(api, keys["myapp-prod"], 80), _burst(api, keys["myapp-staging"], 30)
    )
    rows.append(("prod + staging together", "myapp-prod", 80, p_ok, p_proj, p_org))
    rows.append(("prod + staging together", "myapp-staging", 30, s_ok, s_proj, s_org))
    out(render(rows, ("SCENARIO", "PROJECT", "SENT", "ADMITTED", "REFUSED:PROJECT", "REFUSED:ORG")))
    out(f"\nprod + staging admitted {p_ok + s_ok} of 110: the organization's 100/min is a hard ceiling.")


async def demo(api: Api | None, args: argparse.Namespace) -> int:
    if api is not None:
        await run_demo(api, print)
        return 0
    # No server named: run a private one on an embedded Valkey in a temporary directory.
    from ratelimitd.app import App
    from ratelimitd.settings import Settings

    with tempfile.TemporaryDirectory(prefix="ratelimitd-demo-") as tmp:
        token = "rlt_demo"
        app = App(Settings.load(listen="127.0.0.1:0", data_dir=Path(tmp), operator_token=token))
        await app.start()
        print(f"(a private ratelimitd on 127.0.0.1:{app.port} with an embedded Valkey; pass --address to use yours)\n")
        try:
            local = Api(f"127.0.0.1:{app.port}", token)
            await run_demo(local, print)
            await local.channel.close()
        finally:
            await app.stop(0)
    return 0


# -- wiring ------------------------------------------------------------------

Verb = Callable[[Api, argparse.Namespace], Awaitable[int]]


def _call(verb: Verb, *, demo_mode: bool = False) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        async def go() -> int:
            if demo_mode and not args.address:
                return await demo(None, args)
            api = Api(args.address or DEFAULT_ADDRESS, args.token)
            try:
                return await verb(api, args)
            except grpc.aio.AioRpcError as e:
                print(f"ratelimitd: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
            finally:
                await api.channel.close()

        from ratelimitd.cli import run_async

        return run_async(go())

    return run


def _common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--address", default=os.environ.get("RATELIMITD_ADDRESS"), help=f"server host:port (default {DEFAULT_ADDRESS})"
    )
    p.add_argument("--token", default=os.environ.get("RATELIMITD_TOKEN"), help="credential (or RATELIMITD_TOKEN)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _common(sub.add_parser("demo", help="run the reference's worked example (org 100/min; prod 80, staging 30)"))
    p.set_defaults(func=_call(demo, demo_mode=True))

    p = _common(sub.add_parser("check", help="ask for one decision (CheckAndConsume); exit 3 when refused"))
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--request-id")
    p.set_defaults(func=_call(check))

    p = _common(sub.add_parser("health", help="ask the server's gRPC health service; exit 0 only when SERVING"))
    p.add_argument("--service", default="", help="'' (whole server) or 'storage'")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=_call(health))

    org = sub.add_parser("org", help="organizations").add_subparsers(dest="verb", required=True)
    p = _common(org.add_parser("create", help="create an organization (operator)"))
    p.add_argument("name")
    p.set_defaults(func=_call(org_create))
    p = _common(org.add_parser("limits", help="show, or with --set/--clear change, organization limits"))
    p.add_argument("org")
    _limit_flags(p)
    p.set_defaults(func=_call(org_limits))

    proj = sub.add_parser("project", help="projects").add_subparsers(dest="verb", required=True)
    p = _common(proj.add_parser("create", help="create a project"))
    p.add_argument("org")
    p.add_argument("name")
    p.add_argument("--description", default="")
    p.set_defaults(func=_call(project_create))
    p = _common(proj.add_parser("limits", help="show effective limits, or with --set/--clear change custom ones"))
    p.add_argument("org")
    p.add_argument("project")
    _limit_flags(p)
    p.set_defaults(func=_call(project_limits))

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="verb", required=True)
    p = _common(key.add_parser("create", help="create an API key; the secret is printed once"))
    p.add_argument("org")
    p.add_argument("project")
    p.add_argument("name")
    p.set_defaults(func=_call(key_create))
    p = _common(key.add_parser("list", help="list a project's API keys (metadata only)"))
    p.add_argument("org")
    p.add_argument("project")
    p.set_defaults(func=_call(key_list))
    p = _common(key.add_parser("revoke", help="revoke an API key, effective for the next decision"))
    p.add_argument("org")
    p.add_argument("key")
    p.set_defaults(func=_call(key_revoke))


def _limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="*", help="model the limits are for ('*' = default for all models)")
    p.add_argument("--set", nargs="*", default=[], metavar="LIMIT", help="rpm=100 tpm=6000 or requests/day=1000")
    p.add_argument("--clear", nargs="*", default=[], metavar="NAME", help="rpm tpd or tokens/minute")
