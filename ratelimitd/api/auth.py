"""Reading the bearer credential from gRPC metadata."""

from __future__ import annotations

import grpc


def authorization(context: grpc.aio.ServicerContext[object, object]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None
