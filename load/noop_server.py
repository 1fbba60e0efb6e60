"""A no-op gRPC server on the same protos: the floor of a Python unary call.

    python load/noop_server.py [--port 0] [--max-seconds 600] [--reply full|empty]

Serves ``ratelimitd.v1.RateLimitService`` (CheckAndConsume, ReportUsage, CheckAndConsumeStream: a reply per
request, in order) and
Envoy's ``envoy.service.ratelimit.v3.RateLimitService`` (ShouldRateLimit) with
grpc.aio on uvloop, exactly as ratelimitd's own server is built (generated
deserializers, one grpc.aio server, one event loop), and answers every call with
a fixed "allowed" reply built once at start-up: no validation, no storage, no
metrics. Whatever a call costs this process is what any Python unary gRPC call
costs before doing anything; load/side_by_side.py divides ratelimitd's CPU per
call by this one's.

``--reply full`` (the default) answers a reply of the size and shape ratelimitd
sends for the benchmark's key (six buckets, the x-ratelimit-* headers, ids), so
both servers serialize about the same bytes; ``--reply empty`` answers
``allowed=true`` alone (Envoy: ``OK``), the barest floor.

Loopback only (127.0.0.1), and it stops by itself after ``--max-seconds``
(or on SIGINT/SIGTERM). It prints one line, ``listening on 127.0.0.1:<port>``,
once it accepts calls.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratelimitd.v1 import rate_limit_service_pb2 as service_pb  # noqa: E402
from ratelimitd.v1 import rate_limit_service_pb2_grpc  # noqa: E402
from ratelimitd.v1 import ratelimit_pb2 as pb  # noqa: E402

HOST = "127.0.0.1"
BIG = 10**11


def check_reply(full: bool) -> pb.CheckResponse:
    if not full:
        return pb.CheckResponse(allowed=True, reason=pb.REASON_ALLOWED)
    # What ratelimitd answers for an organization with RPM/RPD/TPM/TPD and a project with RPM/TPM.
    buckets = [
        pb.BucketStatus(
            scope=scope, metric=metric, window=window, limit=BIG, remaining=BIG - used, reset_after_ms=reset
        )
        for scope, metric, window, used, reset in [
            (pb.SCOPE_ORGANIZATION, "requests", "minute", 1, 1),
            (pb.SCOPE_PROJECT, "requests", "minute", 1, 1),
            (pb.SCOPE_ORGANIZATION, "requests", "day", 1, 1),
            (pb.SCOPE_ORGANIZATION, "tokens", "minute", 500, 1),
            (pb.SCOPE_PROJECT, "tokens", "minute", 500, 1),
            (pb.SCOPE_ORGANIZATION, "tokens", "day", 500, 1),
        ]
    ]
    headers = {
        "x-ratelimit-limit-requests": str(BIG),
        "x-ratelimit-remaining-requests": str(BIG - 1),
        "x-ratelimit-reset-requests": "1ms",
        "x-ratelimit-limit-tokens": str(BIG),
        "x-ratelimit-remaining-tokens": str(BIG - 500),
        "x-ratelimit-reset-tokens": "1ms",
    }
    return pb.CheckResponse(
        allowed=True,
        reason=pb.REASON_ALLOWED,
        buckets=buckets,
        headers=headers,
        request_id="req_" + "0" * 24,
        organization_id="org_" + "0" * 16,
        project_id="proj_" + "0" * 16,
    )


def envoy_reply(full: bool) -> rls_pb2.RateLimitResponse:
    ok = rls_pb2.RateLimitResponse.OK
    if not full:
        return rls_pb2.RateLimitResponse(overall_code=ok)
    unit = rls_pb2.RateLimitResponse.RateLimit
    status = rls_pb2.RateLimitResponse.DescriptorStatus(
        code=ok,
        current_limit=unit(requests_per_unit=2**32 - 1, unit=unit.MINUTE, name="project requests per minute"),
        limit_remaining=2**32 - 1,
    )
    headers = [
        base_pb2.HeaderValue(key=k, value=v)
        for k, v in check_reply(True).headers.items()  # same headers as CheckAndConsume
    ]
    return rls_pb2.RateLimitResponse(overall_code=ok, statuses=[status], response_headers_to_add=headers)


class NoopRateLimit(rate_limit_service_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, full: bool) -> None:
        self.check = check_reply(full)
        self.report = pb.ReportUsageResponse(result=pb.ReportUsageResponse.RESULT_RECONCILED)

    async def CheckAndConsume(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        return self.check

    async def ReportUsage(self, request: pb.ReportUsageRequest, context: Any) -> pb.ReportUsageResponse:
        return self.report

    async def CheckAndConsumeStream(
        self, request_iterator: AsyncIterator[pb.CheckRequest], context: Any
    ) -> AsyncIterator[pb.CheckResponse]:
        async for _ in request_iterator:
            yield self.check

    async def ManageProject(
        self, request: service_pb.ManageProjectRequest, context: Any
    ) -> service_pb.ManageProjectResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the no-op server only decides")
        raise AssertionError("abort() raises")


class NoopEnvoy(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, full: bool) -> None:
        self.reply = envoy_reply(full)

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        return self.reply


async def serve(port: int, max_seconds: float, full: bool, reuse_port: bool) -> int:
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
    rate_limit_service_pb2_grpc.add_RateLimitServiceServicer_to_server(NoopRateLimit(full), server)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(NoopEnvoy(full), server)
    bound = server.add_insecure_port(f"{HOST}:{port}")
    if not bound:
        print(f"noop_server: cannot listen on {HOST}:{port}", file=sys.stderr)
        return 1
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {HOST}:{bound}", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        print(f"noop_server: stopping after --max-seconds {max_seconds:g}", file=sys.stderr)
    await server.stop(0)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one, printed)")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="stop by itself after this long")
    ap.add_argument("--reply", choices=["full", "empty"], default="full", help="reply shape (see above)")
    ap.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT, to run several on one port")
    args = ap.parse_args()
    if not 0 < args.max_seconds <= 24 * 3600:
        ap.error("--max-seconds must be in (0, 86400]")
    import uvloop

    return uvloop.run(serve(args.port, args.max_seconds, args.reply == "full", args.reuse_port))


if __name__ == "__main__":
    raise SystemExit(main())
