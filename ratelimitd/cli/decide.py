"""``check`` and ``report``: the decision API (CheckAndConsume, ReportUsage) from a terminal."""

from __future__ import annotations

import argparse

from ratelimitd.cli.client import Api, new_request_id, retry_unavailable
from ratelimitd.cli.command import SubParsers, verb_parser
from ratelimitd.cli.output import emit, format_usd, render
from ratelimitd.engine.outcomes import BY_REASON, go_duration
from ratelimitd.v1 import ratelimit_pb2 as pb

REFUSED_DECISION = 3


def verdict(reply: pb.CheckResponse) -> str:
    """ALLOWED, or the refusal with what an HTTP edge answers for it (the outcome table's row)."""
    if reply.allowed:
        return "ALLOWED"
    name = pb.Reason.Name(reply.reason)
    rule = BY_REASON.get(name)
    if rule is None:
        return f"REFUSED ({name})"
    cure = f"retry in {go_duration(reply.retry_after_ms)}" if rule.retry_after else "waiting will not help"
    return f"REFUSED ({name}): an HTTP edge answers {rule.http_status} {rule.code}; {cure}"


def decision_text(reply: pb.CheckResponse) -> str:
    lines = [verdict(reply)]
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


async def check(api: Api, args: argparse.Namespace) -> int:
    # Always a request id of our own, so a retry after a timeout cannot charge twice.
    request = pb.CheckRequest(
        api_key=args.api_key, model=args.model, requests=args.requests, tokens=args.tokens,
        request_id=args.request_id or new_request_id(),
    )  # fmt: skip
    reply = await retry_unavailable(lambda: api.decisions.CheckAndConsume(request))
    emit(args, reply, lambda: decision_text(reply))
    return 0 if reply.allowed else REFUSED_DECISION


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
            f"${format_usd(reply.spend_usd_micros)}"
        ),
    )
    return 0


def add_parsers(sub: SubParsers) -> None:
    p = verb_parser(sub, "check", check, "ask for one decision (CheckAndConsume); exit 3 when refused")
    p.add_argument("--api-key", required=True, help="the API key (rlk_...) the request comes with")
    p.add_argument("--model", required=True, help="the model the request is for")
    p.add_argument("--requests", type=int, default=1, help="requests to charge (default 1)")
    p.add_argument("--tokens", type=int, default=0, help="token estimate to reserve (default 0)")
    p.add_argument("--request-id", help="the request's id (default: a new one); report usage with it")

    p = verb_parser(sub, "report", report, "report what a request used (ReportUsage)")
    p.add_argument("--api-key", required=True, help="the API key the request came with")
    p.add_argument("--request-id", required=True, help="the id the decision was made with")
    p.add_argument("--model", help="needed when the request was never checked")
    p.add_argument("--input", type=int, required=True, help="prompt tokens, cached ones included")
    p.add_argument("--output", type=int, required=True, help="completion tokens")
    p.add_argument("--cached", type=int, default=0, help="cached prompt tokens (default 0)")
    p.add_argument("--status", type=int, default=200, help="the HTTP status the request ended with (default 200)")
    p.add_argument("--latency-ms", type=int, default=0, help="how long the request took, for the request log")
