"""The one mapping from engine errors to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from ratelimitd.core.errors import ErrorKind, RatelimitdError
from ratelimitd.engine import ids

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
            await refuse(context, e, fn.__name__, getattr(self, "storage_failed", None), request)
            raise  # refuse() raises; this line only tells the type checker

    return call


async def refuse(
    context: Any,
    error: RatelimitdError,
    where: str,
    storage_failed: Callable[[], None] | None,
    request: Any = None,
) -> NoReturn:
    """Ends the call with the error's status and message; a transient (storage) error is logged
    (with what ``request`` names, see log_context) and also tells ``storage_failed``, so health
    turns NOT_SERVING at once rather than at the next probe."""
    if error.transient:
        log.warning("%s: %s", where, error.message, extra=log_context(request) if request is not None else None)
        if storage_failed is not None:
            storage_failed()
    await context.abort(STATUS[error.kind], error.message)
    raise AssertionError("grpc's abort() raises")


def log_context(request: Any) -> dict[str, str]:
    """The organization, project and request id a request names, for its log lines (never its key)."""
    context = {"request_id": str(getattr(request, "request_id", ""))}
    key = getattr(request, "api_key", "")
    parsed = ids.parse_api_key_cached(key) if isinstance(key, str) and key else None
    if parsed is not None:
        context["org"] = parsed.org_id
    project = getattr(request, "project", None)
    if getattr(project, "organization_id", ""):  # CheckAndConsume's project caller (a message)
        context["org"] = str(project.organization_id)  # type: ignore[union-attr]
        context["project"] = str(project.project_id)  # type: ignore[union-attr]
    else:
        if org := getattr(request, "organization_id", ""):
            context["org"] = str(org)
        if proj := getattr(request, "project_id", ""):
            context["project"] = str(proj)
    return context
