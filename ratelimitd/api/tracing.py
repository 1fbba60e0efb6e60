"""A span for each RPC, with the decision's outcome: an interceptor, installed only when tracing is on.

With tracing off the server has no such interceptor, so a call creates no span
object and runs no code of this module. With it on, each call of our services
and of Envoy's gets one server span, made current while the handler runs so the
storage spans (ratelimitd/tracing.py) of the call become its children; a
``traceparent`` header from the caller makes it part of the caller's trace.

What a span says comes from the reply, never from the request: the outcome
(``allowed`` or the refusal reason, Envoy's overall code), organization and
project ids. The request's API key, the authorization header and every other
secret never reach an attribute. Health and reflection calls (``/grpc.*``) are
not traced: probes every few seconds would bury the calls that matter.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import Span

# Methods of these prefixes are left alone (see the module's docstring).
_UNTRACED = ("/grpc.",)
_PROPAGATOR = TraceContextTextMapPropagator()


def outcome_of(reply: Any) -> dict[str, str | bool]:
    """Span attributes one reply carries: the decision's outcome and who it was for."""
    attributes: dict[str, str | bool] = {}
    descriptor = getattr(reply, "DESCRIPTOR", None)
    if descriptor is None:
        return attributes
    fields = descriptor.fields_by_name
    if "allowed" in fields and "reason" in fields:  # CheckResponse
        reason = fields["reason"].enum_type.values_by_number[reply.reason].name
        attributes["ratelimitd.allowed"] = reply.allowed
        attributes["ratelimitd.outcome"] = "allowed" if reply.allowed else reason.removeprefix("REASON_").lower()
    elif "overall_code" in fields:  # Envoy's RateLimitResponse
        code = fields["overall_code"].enum_type.values_by_number[reply.overall_code].name
        attributes["ratelimitd.allowed"] = code != "OVER_LIMIT"
        attributes["ratelimitd.outcome"] = code.lower()
    elif "result" in fields and "counted_tokens" in fields:  # ReportUsageResponse
        result = fields["result"].enum_type.values_by_number[reply.result].name
        attributes["ratelimitd.outcome"] = result.removeprefix("RESULT_").lower()
    for name in ("organization_id", "project_id"):
        if name in fields and getattr(reply, name):
            attributes[f"ratelimitd.{name}"] = getattr(reply, name)
    return attributes


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Put it first in the server's interceptors, so the span covers what the others do too."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNTRACED):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, method))
            self._wrapped[method] = cached
        traced: grpc.RpcMethodHandler[Any, Any] = cached[1]
        return traced

    def _wrap(self, handler: Any, method: str) -> Any:
        service, _, name = method.lstrip("/").rpartition("/")
        static = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        changes = {}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                changes[kind] = self._behaviour(behaviour, f"{service}/{name}", static)
        return handler._replace(**changes)

    def _span(self, span_name: str, static: dict[str, str], context: Any) -> Any:
        carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        return self._tracer.start_as_current_span(
            span_name,
            context=_PROPAGATOR.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=static,
            record_exception=False,
            set_status_on_exception=False,
        )

    def _behaviour(self, behaviour: Callable[..., Any], span_name: str, static: dict[str, str]) -> Callable[..., Any]:
        # grpc drives a handler by its kind (coroutine or async generator): the wrapper keeps it.
        if inspect.isasyncgenfunction(behaviour):

            async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
                with self._span(span_name, static, context) as span:
                    answers = refused = 0
                    try:
                        async for reply in behaviour(request, context):
                            answers += 1
                            refused += outcome_of(reply).get("ratelimitd.allowed") is False
                            yield reply
                    except BaseException:
                        _failed(span, context)
                        raise
                    span.set_attributes({"ratelimitd.answers": answers, "ratelimitd.refused": refused})
                    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])

            return generator

        async def awaited(request: Any, context: Any) -> Any:
            with self._span(span_name, static, context) as span:
                try:
                    reply = behaviour(request, context)
                    if inspect.isawaitable(reply):
                        reply = await reply
                except BaseException:
                    _failed(span, context)
                    raise
                span.set_attributes(outcome_of(reply))
                span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
                return reply

        return awaited


def _failed(span: Span, context: Any) -> None:
    """The status the call ends with (an abort sets it on the context before it raises)."""
    code = context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    # The code's name only: a status message is the caller's to read, not the trace store's.
    span.set_status(Status(StatusCode.ERROR, code.name))
