"""``usage ORG`` and ``logs ORG PROJECT``: what projects used, and their request logs."""

from __future__ import annotations

import argparse

from ratelimitd.cli.client import Api, resolve_project
from ratelimitd.cli.command import SubParsers, org_arg, project_arg, verb_parser
from ratelimitd.cli.errors import NotUnderstood
from ratelimitd.cli.output import emit, format_usd, render
from ratelimitd.cli.pages import collect
from ratelimitd.cli.projects import project_label, project_names
from ratelimitd.cli.times import format_stamp, now_ms, parse_period_s, stamp
from ratelimitd.v1 import usage_pb2 as upb

_GRANULARITY = {"minute": upb.GRANULARITY_MINUTE, "hour": upb.GRANULARITY_HOUR, "day": upb.GRANULARITY_DAY}
_GROUP = {"project": upb.GROUP_BY_PROJECT, "model": upb.GROUP_BY_MODEL, "key": upb.GROUP_BY_API_KEY}


def _groups(by: str | None) -> list[upb.GroupBy.ValueType]:
    groups = [g for g in by.split(",") if g] if by else []
    if unknown := [g for g in groups if g not in _GROUP]:
        raise NotUnderstood(f"--by {unknown[0]!r} is not one of {', '.join(_GROUP)}")
    return [_GROUP[g] for g in groups]


def usage_table(reply: upb.GetUsageResponse, names: dict[str, str]) -> str:
    rows = [
        (format_stamp(r, "bucket_start_time"), project_label(r.project_id, names) if r.project_id else "*",
         r.model or "*", r.api_key_id or "*", r.requests, sum(r.refusals.values()), r.input_tokens, r.output_tokens,
         r.cached_tokens, format_usd(r.spend_usd_micros))
        for r in [*reply.rows, reply.total]
    ]  # fmt: skip
    rows[-1] = ("total", "", "", "", *rows[-1][4:])
    header = ("BUCKET (UTC)", "PROJECT", "MODEL", "KEY", "REQUESTS", "REFUSED", "INPUT", "OUTPUT", "CACHED", "USD")
    return render(rows, header)


async def usage(api: Api, args: argparse.Namespace) -> int:
    groups = _groups(args.by)
    since_s = parse_period_s(args.since, "--since")
    end_ms = now_ms()
    project = await resolve_project(api, args.org, args.project) if args.project else ""
    reply = await api.usage.GetUsage(
        upb.GetUsageRequest(
            organization_id=args.org, start_time=stamp(end_ms - since_s * 1000), end_time=stamp(end_ms + 1),
            granularity=_GRANULARITY[args.granularity], group_by=groups, project_id=project,
        )
    )  # fmt: skip
    names = {} if args.json else await project_names(api, args.org)
    emit(args, reply, lambda: usage_table(reply, names))
    return 0


def _outcome(args: argparse.Namespace) -> upb.ListRequestLogsRequest.Outcome.ValueType:
    if args.refused:
        return upb.ListRequestLogsRequest.OUTCOME_REFUSED
    if args.allowed:
        return upb.ListRequestLogsRequest.OUTCOME_ALLOWED
    return upb.ListRequestLogsRequest.OUTCOME_UNSPECIFIED


def logs_table(reply: upb.ListRequestLogsResponse) -> str:
    rows = [
        (format_stamp(e, "request_time"), e.request_id, e.model, e.api_key_id, "allowed" if e.allowed else e.reason,
         e.input_tokens if e.allowed else e.requested_tokens, e.output_tokens, e.cached_tokens,
         e.status_code or "-", e.latency.ToMilliseconds() if e.HasField("latency") else "-")
        for e in reply.entries
    ]  # fmt: skip
    header = ("TIME (UTC)", "REQUEST", "MODEL", "KEY", "DECISION", "INPUT", "OUTPUT", "CACHED", "STATUS", "MS")
    return render(rows, header)


async def logs(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project)

    def page(token: str, size: int) -> upb.ListRequestLogsRequest:
        return upb.ListRequestLogsRequest(
            organization_id=args.org, project_id=project, model=args.model or "", api_key_id=args.key or "",
            outcome=_outcome(args), page_token=token, page_size=size,
        )  # fmt: skip

    entries, token = await collect(
        lambda token, size: api.usage.ListRequestLogs(page(token, size)), lambda p: p.entries, limit=args.limit
    )
    reply = upb.ListRequestLogsResponse(entries=entries, next_page_token=token)
    emit(args, reply, lambda: logs_table(reply))
    return 0


def add_parsers(sub: SubParsers) -> None:
    p = verb_parser(sub, "usage", usage, "usage over a recent period, by time bucket and grouping")
    org_arg(p)
    p.add_argument("--project", help="only this project (id or name)")
    p.add_argument("--since", default="24h", help="how far back: 90s, 90m, 24h, 7d (default 24h)")
    p.add_argument("--granularity", choices=list(_GRANULARITY), default="hour", help="time bucket (default hour)")
    p.add_argument("--by", help="comma-separated groupings: project, model, key (default: none, the total)")

    p = verb_parser(sub, "logs", logs, "a project's request log, newest first")
    org_arg(p)
    project_arg(p)
    p.add_argument("--model", help="only this model's requests")
    p.add_argument("--key", help="only this API key's requests (key id)")
    outcome = p.add_mutually_exclusive_group()
    outcome.add_argument("--refused", action="store_true", help="only refused requests")
    outcome.add_argument("--allowed", action="store_true", help="only allowed requests")
    p.add_argument("--limit", type=int, default=50, help="at most this many entries (default 50)")
