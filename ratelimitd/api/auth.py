"""Reading the bearer credential from gRPC metadata."""

from __future__ import annotations

from typing import Any

import grpc


def authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None
