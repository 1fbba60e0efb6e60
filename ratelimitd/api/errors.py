"""The one mapping from engine errors to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from ratelimitd.core.errors import ErrorKind, RatelimitdError

log = logging.getLogger(__name__)

STATUS = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[S, Req, Any], Awaitable[Resp]]


def rpc(fn: Handler[S, Req, Resp]) -> Handler[S, Req, Resp]:
    """Wraps a servicer method: a RatelimitdError becomes its gRPC status and message
    (see refuse; the servicer's ``storage_failed`` hook hears of storage errors)."""

    @functools.wraps(fn)
    async def call(self: S, request: Req, context: Any) -> Resp:
        try:
            return await fn(self, request, context)
        except RatelimitdError as e:
            await refuse(context, e, fn.__name__, getattr(self, "storage_failed", None))
            raise  # refuse() raises; this line only tells the type checker

    return call


async def refuse(
    context: Any, error: RatelimitdError, where: str, storage_failed: Callable[[], None] | None
) -> NoReturn:
    """Ends the call with the error's status and message; a transient (storage) error also
    tells ``storage_failed``, so health turns NOT_SERVING at once rather than at the next probe."""
    if error.transient:
        log.warning("%s: %s", where, error.message)
        if storage_failed is not None:
            storage_failed()
    await context.abort(STATUS[error.kind], error.message)
    raise AssertionError("grpc's abort() raises")
