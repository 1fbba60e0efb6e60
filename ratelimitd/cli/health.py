"""``health``: ask the server's gRPC health service."""

from __future__ import annotations

import argparse

from grpc_health.v1 import health_pb2, health_pb2_grpc

from ratelimitd.cli.client import Api
from ratelimitd.cli.command import SubParsers, verb_parser
from ratelimitd.cli.output import emit


async def health(api: Api, args: argparse.Namespace) -> int:
    reply = await health_pb2_grpc.HealthStub(api.channel).Check(
        health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
    )
    emit(args, reply, lambda: health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def add_parsers(sub: SubParsers) -> None:
    p = verb_parser(sub, "health", health, "ask the server's gRPC health service; exit 0 only when SERVING")
    p.add_argument("--service", default="", help="'' (whole server, the default) or 'storage'")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
