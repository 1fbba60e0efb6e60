"""``audit [ORG]``: the audit trail, newest first."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence

from ratelimitd.cli.client import Api, resolve_project
from ratelimitd.cli.command import SubParsers, verb_parser
from ratelimitd.cli.members import ROLE_NAMES
from ratelimitd.cli.output import emit, render
from ratelimitd.cli.pages import collect
from ratelimitd.cli.projects import project_label, project_names
from ratelimitd.cli.times import format_stamp, parse_moment_ms, stamp
from ratelimitd.v1 import admin_pb2 as apb


def _change(before: str, after: str) -> str:
    b, a = json.loads(before or "null"), json.loads(after or "null")
    if b is None:
        return "+ " + json.dumps(a, separators=(",", ":"))
    if a is None:
        return "- " + json.dumps(b, separators=(",", ":"))
    if isinstance(b, dict) and isinstance(a, dict):
        return "; ".join(
            f"{k}: {json.dumps(b.get(k))} -> {json.dumps(a.get(k))}"
            for k in sorted(b.keys() | a.keys())
            if b.get(k) != a.get(k)
        )
    return f"{json.dumps(b)} -> {json.dumps(a)}"


def _actor(p: apb.Principal) -> str:
    return "operator" if p.kind == "operator" else f"{p.name} ({ROLE_NAMES[p.role]})"


def audit_table(events: Sequence[apb.AuditEvent], names: Mapping[str, str]) -> str:
    return render(
        [(format_stamp(e, "event_time"), _actor(e.actor), e.operation, project_label(e.project_id, names), e.target,
          _change(e.before, e.after))
         for e in events],
        ("TIME", "WHO", "OPERATION", "PROJECT", "TARGET", "CHANGE"),
    )  # fmt: skip


async def audit(api: Api, args: argparse.Namespace) -> int:
    since = stamp(parse_moment_ms(args.since, "--since")) if args.since else None
    until = stamp(parse_moment_ms(args.until, "--until")) if args.until else None
    # An id is used as it is, so a deleted project's history stays readable.
    project = await resolve_project(api, args.org, args.project) if args.project else ""

    def page(token: str, size: int) -> apb.ListAuditEventsRequest:
        return apb.ListAuditEventsRequest(
            organization_id=args.org or "", project_id=project, start_time=since, end_time=until,
            page_token=token, page_size=size,
        )  # fmt: skip

    events, token = await collect(
        lambda token, size: api.audit.ListAuditEvents(page(token, size)), lambda p: p.events, limit=args.limit
    )
    reply = apb.ListAuditEventsResponse(events=events, next_page_token=token)
    names = await project_names(api, args.org) if args.org and not args.json else {}
    emit(args, reply, lambda: audit_table(reply.events, names))
    return 0


def add_parsers(sub: SubParsers) -> None:
    p = verb_parser(sub, "audit", audit, "the audit trail, newest first (without ORG: the platform's)")
    p.add_argument("org", nargs="?", help="organization id; without it, the platform's trail (operator)")
    p.add_argument("--project", help="only this project's events (id or name)")
    p.add_argument("--since", help="2025-06-01, 2025-06-01T12:00:00Z, 90m or 7d (ago), or Unix milliseconds")
    p.add_argument("--until", help="same forms as --since")
    p.add_argument("--limit", type=int, default=50, help="at most this many events (default 50)")
