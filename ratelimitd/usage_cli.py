"""CLI verbs for usage, spend, prices and request logs (UsageService) and ReportUsage.

ratelimitd usage ORG [--project P] [--since 24h] [--granularity hour] [--by project,model]
ratelimitd spend ORG [--month 2026-11]
ratelimitd spend-limit ORG [--project P] (USD | --clear)
ratelimitd price ORG MODEL --input 0.05 --output 0.08 [--cached 0.025]
ratelimitd prices ORG
ratelimitd logs ORG PROJECT [--model M] [--key K] [--refused | --allowed] [--limit N]
ratelimitd report --api-key K --request-id R --input N --output N [--cached N] [--model M]
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from ratelimitd.client_cli import (
    Api,
    CliError,
    client_flags,
    emit,
    render,
    resolve_project,
    retry_unavailable,
    verb_command,
)
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc

_GRANULARITY = {"minute": upb.GRANULARITY_MINUTE, "hour": upb.GRANULARITY_HOUR, "day": upb.GRANULARITY_DAY}
_GROUP = {"project": upb.GROUP_BY_PROJECT, "model": upb.GROUP_BY_MODEL, "key": upb.GROUP_BY_API_KEY}
_UNITS = {"m": 60, "h": 3600, "d": 86400}


def stub(api: Api) -> usage_pb2_grpc.UsageServiceAsyncStub:
    return usage_pb2_grpc.UsageServiceStub(api.channel)


def parse_since(text: str) -> int:
    """'90m', '24h' or '7d' -> seconds."""
    if len(text) < 2 or text[-1] not in _UNITS or not text[:-1].isdigit():
        raise CliError(f"--since {text!r} is not a number followed by m, h or d (e.g. 24h)")
    return int(text[:-1]) * _UNITS[text[-1]]


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _stamp(ms: int) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


def _micros(usd: float) -> int:
    """The CLI takes USD; the API counts whole micro-dollars."""
    return round(usd * 1_000_000)


def _usd(micros: int) -> str:
    return f"{micros / 1_000_000:.6f}"


async def usage(api: Api, args: argparse.Namespace) -> int:
    groups = [g for g in args.by.split(",") if g] if args.by else []
    if unknown := [g for g in groups if g not in _GROUP]:
        raise CliError(f"--by {unknown[0]!r} is not one of {', '.join(_GROUP)}")
    end_ms = int(time.time() * 1000)
    project = await resolve_project(api, args.org, args.project) if args.project else ""
    reply = await stub(api).GetUsage(
        upb.GetUsageRequest(
            organization_id=args.org,
            start_time=_stamp(end_ms - parse_since(args.since) * 1000),
            end_time=_stamp(end_ms + 1),
            granularity=_GRANULARITY[args.granularity],
            group_by=[_GROUP[g] for g in groups],
            project_id=project,
        ),
        metadata=api.metadata,
    )

    def table() -> str:
        rows = [
            (_when(r.bucket_start_time.ToMilliseconds()), r.project_id or "*", r.model or "*", r.api_key_id or "*",
             r.requests,
             sum(r.refusals.values()), r.input_tokens, r.output_tokens, r.cached_tokens, _usd(r.spend_usd_micros))
            for r in [*reply.rows, reply.total]
        ]  # fmt: skip
        if rows:
            rows[-1] = ("total", "", "", "", *rows[-1][4:])
        header = ("BUCKET (UTC)", "PROJECT", "MODEL", "KEY", "REQUESTS", "REFUSED", "INPUT", "OUTPUT", "CACHED", "USD")
        return render(rows, header)

    emit(args, reply, table)
    return 0


def _spend_table(reply: upb.GetSpendResponse) -> str:
    rows = [
        (line.project_id or "(organization)", _usd(line.spend_usd_micros),
         _usd(line.limit_usd_micros) if line.HasField("limit_usd_micros") else "-",
         ",".join(f"{t}%" for t in line.thresholds_crossed) or "-", "blocked" if line.blocked else "")
        for line in [reply.organization, *reply.projects]
    ]  # fmt: skip
    return f"month {reply.month} (UTC)\n" + render(rows, ("PROJECT", "SPEND USD", "LIMIT USD", "ALERTS", ""))


async def spend(api: Api, args: argparse.Namespace) -> int:
    reply = await stub(api).GetSpend(
        upb.GetSpendRequest(organization_id=args.org, month=args.month or ""), metadata=api.metadata
    )
    emit(args, reply, lambda: _spend_table(reply))
    return 0


async def spend_limit(api: Api, args: argparse.Namespace) -> int:
    if (args.usd is None) == (not args.clear):
        raise CliError("give a limit in USD or --clear, not both or neither")
    project = await resolve_project(api, args.org, args.project) if args.project else ""
    request = upb.SetSpendLimitRequest(organization_id=args.org, project_id=project)
    if args.usd is not None:
        request.limit_usd_micros = _micros(args.usd)
    reply = await stub(api).SetSpendLimit(request, metadata=api.metadata)
    emit(args, reply, lambda: _spend_table(reply))
    return 0


def _prices_table(prices: list[upb.Price]) -> str:
    rows = [
        (p.model, _usd(p.input_usd_micros_per_million), _usd(p.output_usd_micros_per_million),
         _usd(p.cached_input_usd_micros_per_million))
        for p in prices
    ]  # fmt: skip
    return render(rows, ("MODEL", "INPUT $/M", "OUTPUT $/M", "CACHED INPUT $/M"))


async def price(api: Api, args: argparse.Namespace) -> int:
    reply = await stub(api).SetPrice(
        upb.SetPriceRequest(
            price=upb.Price(
                organization_id=args.org, model=args.model, input_usd_micros_per_million=_micros(args.input),
                output_usd_micros_per_million=_micros(args.output),
                cached_input_usd_micros_per_million=_micros(args.cached),
            )
        ),
        metadata=api.metadata,
    )  # fmt: skip
    emit(args, reply, lambda: _prices_table([reply]))
    return 0


async def prices(api: Api, args: argparse.Namespace) -> int:
    reply = await stub(api).ListPrices(
        upb.ListPricesRequest(organization_id=args.org, page_size=1000), metadata=api.metadata
    )
    emit(args, reply, lambda: _prices_table(list(reply.prices)))
    return 0


async def logs(api: Api, args: argparse.Namespace) -> int:
    outcome = upb.ListRequestLogsRequest.OUTCOME_UNSPECIFIED
    if args.refused:
        outcome = upb.ListRequestLogsRequest.OUTCOME_REFUSED
    elif args.allowed:
        outcome = upb.ListRequestLogsRequest.OUTCOME_ALLOWED
    project = await resolve_project(api, args.org, args.project)
    reply = await stub(api).ListRequestLogs(
        upb.ListRequestLogsRequest(
            organization_id=args.org, project_id=project, model=args.model or "", api_key_id=args.key or "",
            outcome=outcome, page_size=args.limit,
        ),
        metadata=api.metadata,
    )  # fmt: skip

    def table() -> str:
        rows = [
            (_when(e.request_time.ToMilliseconds()), e.request_id, e.model, e.api_key_id,
             "allowed" if e.allowed else e.reason,
             e.input_tokens if e.allowed else e.requested_tokens, e.output_tokens, e.cached_tokens,
             e.status_code or "-", e.latency.ToMilliseconds() or "-")
            for e in reply.entries
        ]  # fmt: skip
        header = ("TIME (UTC)", "REQUEST", "MODEL", "KEY", "DECISION", "INPUT", "OUTPUT", "CACHED", "STATUS", "MS")
        return render(rows, header)

    emit(args, reply, table)
    return 0


async def report(api: Api, args: argparse.Namespace) -> int:
    request = pb.ReportUsageRequest(
        api_key=args.api_key, request_id=args.request_id, model=args.model or "", input_tokens=args.input,
        output_tokens=args.output, cached_tokens=args.cached, status_code=args.status, latency_ms=args.latency_ms,
    )  # fmt: skip
    # the same request id on every attempt: a report that went through is counted once
    reply = await retry_unavailable(lambda: api.decisions.ReportUsage(request))
    result = pb.ReportUsageResponse.Result.Name(reply.result).removeprefix("RESULT_").lower()
    emit(
        args,
        reply,
        lambda: (
            f"{result}: {reply.counted_tokens} tokens count toward limits, {reply.token_delta:+d} to the buckets, "
            f"${_usd(reply.spend_usd_micros)}"
        ),
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = client_flags(sub.add_parser("usage", help="usage over a recent period, by time bucket and grouping"))
    p.add_argument("org")
    p.add_argument("--project", help="only this project (id or name)")
    p.add_argument("--since", default="24h", help="how far back: 90m, 24h, 7d (default 24h)")
    p.add_argument("--granularity", choices=list(_GRANULARITY), default="hour")
    p.add_argument("--by", help="comma-separated: project,model,key")
    p.set_defaults(func=verb_command(usage))

    p = client_flags(sub.add_parser("spend", help="monthly spend against the limits, with alert thresholds crossed"))
    p.add_argument("org")
    p.add_argument("--month", help="YYYY-MM (UTC); default this month")
    p.set_defaults(func=verb_command(spend))

    p = client_flags(sub.add_parser("spend-limit", help="set or clear a monthly spend limit (organization or project)"))
    p.add_argument("org")
    p.add_argument("usd", nargs="?", type=float, help="USD per calendar month (UTC)")
    p.add_argument("--project", help="a project (id or name) instead of the organization")
    p.add_argument("--clear", action="store_true")
    p.set_defaults(func=verb_command(spend_limit))

    p = client_flags(
        sub.add_parser("price", help="set a model's price (USD per million tokens); model '*' is the default")
    )
    p.add_argument("org")
    p.add_argument("model")
    p.add_argument("--input", type=float, required=True)
    p.add_argument("--output", type=float, required=True)
    p.add_argument("--cached", type=float, default=0.0, help="cached input tokens (default 0)")
    p.set_defaults(func=verb_command(price))

    p = client_flags(sub.add_parser("prices", help="list model prices"))
    p.add_argument("org")
    p.set_defaults(func=verb_command(prices))

    p = client_flags(sub.add_parser("logs", help="a project's request log, newest first"))
    p.add_argument("org")
    p.add_argument("project", help="id or name")
    p.add_argument("--model")
    p.add_argument("--key", help="API key id")
    outcome = p.add_mutually_exclusive_group()
    outcome.add_argument("--refused", action="store_true")
    outcome.add_argument("--allowed", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=verb_command(logs))

    p = client_flags(sub.add_parser("report", help="report what a request used (ReportUsage)"))
    p.add_argument("--api-key", required=True)
    p.add_argument("--request-id", required=True)
    p.add_argument("--model", help="needed when the request was never checked")
    p.add_argument("--input", type=int, required=True, help="prompt tokens, cached ones included")
    p.add_argument("--output", type=int, required=True)
    p.add_argument("--cached", type=int, default=0)
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--latency-ms", type=int, default=0)
    p.set_defaults(func=verb_command(report))
