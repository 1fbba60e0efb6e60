"""RateLimitService: validates input, asks the engine, builds the reply. Nothing else."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from ratelimitd.api.auth import authorization
from ratelimitd.api.errors import STATUS, rpc
from ratelimitd.api.metrics import Metrics
from ratelimitd.engine import ids
from ratelimitd.engine.authz import authorize
from ratelimitd.engine.credentials import Credentials
from ratelimitd.engine.decisions import BucketState, Caller, Decider, Decision, Outcome, Scope
from ratelimitd.engine.errors import (
    InvalidArgument,
    NotFound,
    RatelimitdError,
    StorageOutcomeUnknown,
    StorageUnavailable,
)
from ratelimitd.engine.explain import refusal_message
from ratelimitd.engine.headers import rate_limit_headers
from ratelimitd.engine.limits import MAX_LIMIT, validate_model
from ratelimitd.engine.usage import ReportResult, Usage
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import ratelimit_pb2_grpc

log = logging.getLogger(__name__)

MAX_REQUESTS = 1_000_000
# Requests of one CheckAndConsumeStream decided at once; beyond it the stream is
# read no further until answers go out (HTTP/2 flow control holds the sender).
MAX_STREAM_IN_FLIGHT = 256
MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]+$")

_REASON = {
    Outcome.ALLOWED: pb.REASON_UNSPECIFIED,
    Outcome.PROJECT_LIMIT: pb.REASON_PROJECT_LIMIT,
    Outcome.ORGANIZATION_LIMIT: pb.REASON_ORGANIZATION_LIMIT,
    Outcome.TOO_LARGE: pb.REASON_REQUEST_TOO_LARGE,
    Outcome.INVALID_API_KEY: pb.REASON_INVALID_API_KEY,
    Outcome.MODEL_NOT_AVAILABLE: pb.REASON_MODEL_NOT_AVAILABLE,
    Outcome.MODEL_BLOCKED: pb.REASON_MODEL_BLOCKED,
    Outcome.SPEND_LIMIT: pb.REASON_SPEND_LIMIT,
    Outcome.REQUEST_ID_REUSED: pb.REASON_REQUEST_ID_REUSED,
}


def reason_name(outcome: Outcome) -> str:
    return pb.Reason.Name(_REASON.get(outcome, pb.REASON_UNSPECIFIED))


_SCOPE = {Scope.ORGANIZATION: pb.SCOPE_ORGANIZATION, Scope.PROJECT: pb.SCOPE_PROJECT}
_RESULT = {
    ReportResult.RECONCILED: pb.ReportUsageResponse.RESULT_RECONCILED,
    ReportResult.DUPLICATE: pb.ReportUsageResponse.RESULT_DUPLICATE,
    ReportResult.UNRESERVED: pb.ReportUsageResponse.RESULT_UNRESERVED,
}


def validate_costs(requests: int, tokens: int) -> tuple[int, int]:
    """Request-level cost rules: 0 requests means 1; negative or absurd counts are errors."""
    if requests < 0:
        raise InvalidArgument(f"requests is {requests}; it must be 0 (meaning 1) or more")
    if requests > MAX_REQUESTS:
        raise InvalidArgument(f"requests is {requests}; at most {MAX_REQUESTS} are allowed in one call")
    if tokens < 0:
        raise InvalidArgument(f"tokens is {tokens}; it must be 0 or more")
    if tokens > MAX_LIMIT:
        raise InvalidArgument(f"tokens is {tokens}; at most {MAX_LIMIT} are allowed in one call")
    return requests or 1, tokens


def validate_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(
            f"request_id is {len(request_id)} characters long, at most {MAX_REQUEST_ID_LENGTH} are allowed"
        )
    if request_id and not _REQUEST_ID_RE.match(request_id):
        raise InvalidArgument("request_id may only contain printable ASCII characters without spaces")
    return request_id


def bucket_pb(b: BucketState) -> pb.BucketStatus:
    return pb.BucketStatus(
        scope=_SCOPE[b.scope],
        metric=b.dimension.metric,
        window=b.dimension.window,
        limit=b.limit,
        remaining=b.remaining,
        reset_after_ms=b.reset_after_ms,
    )


class RateLimitServicer(ratelimit_pb2_grpc.RateLimitServiceServicer):
    def __init__(
        self,
        decider: Decider,
        usage: Usage,
        credentials: Credentials,
        header_windows: Mapping[str, str],
        on_storage_error: str,
        storage_failed: Callable[[], None],
        metrics: Metrics,
    ) -> None:
        self._decider = decider
        self._usage = usage
        self._credentials = credentials
        self._header_windows = dict(header_windows)
        self._on_storage_error = on_storage_error
        self.storage_failed = storage_failed
        self._decisions = metrics.decisions
        self._storage_unavailable = metrics.storage_unavailable_decisions
        self._reports = metrics.reports
        self._seconds = metrics.check_seconds
        self._labelled = metrics.labelled

    @rpc
    async def CheckAndConsume(
        self, request: pb.CheckRequest, context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse]
    ) -> pb.CheckResponse:
        return await self._check(request, context)

    async def CheckAndConsumeStream(
        self,
        request_iterator: AsyncIterator[pb.CheckRequest],
        context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse],
    ) -> AsyncIterator[pb.CheckResponse]:
        """Each request decided as it arrives, concurrently; the answers in the order of the requests."""
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[asyncio.Future[pb.CheckResponse] | None] = asyncio.Queue(MAX_STREAM_IN_FLIGHT)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await answers.put(loop.create_task(self._answer(request, context)))
            except Exception as e:  # noqa: BLE001 - a broken request stream (an abort): ends the call, in order
                broken: asyncio.Future[pb.CheckResponse] = loop.create_future()
                broken.set_exception(e)
                await answers.put(broken)
                return
            await answers.put(None)

        reading = loop.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield await answer
        finally:
            reading.cancel()
            while not answers.empty():
                if (left := answers.get_nowait()) is not None:
                    left.cancel()

    async def _answer(
        self, request: pb.CheckRequest, context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse]
    ) -> pb.CheckResponse:
        """One request of a stream: the unary call's decision, or its error status as an answer."""
        try:
            return await self._check(request, context)
        except RatelimitdError as e:
            if e.transient:
                log.warning("CheckAndConsumeStream: %s", e.message)
                self.storage_failed()
            return pb.CheckResponse(error_code=STATUS[e.kind].value[0], error_message=e.message)

    async def _check(
        self, request: pb.CheckRequest, context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse]
    ) -> pb.CheckResponse:
        model = validate_model(request.model, wildcard=False)
        requests, tokens = validate_costs(request.requests, request.tokens)
        request_id = validate_request_id(request.request_id)
        caller = await self._caller(request, context)
        if caller is None:  # malformed key: refused without a storage call
            decision = Decision(Outcome.INVALID_API_KEY, "", "", request_id, 0, None, (), False)
        else:
            try:
                with self._seconds.time():
                    decision = await self._decider.check(caller, model, requests, tokens, request_id)
            except StorageUnavailable as e:
                if self._on_storage_error == "unavailable":
                    if request_id or not isinstance(e, StorageOutcomeUnknown):
                        raise
                    # Without a request id the call cannot be retried exactly: say so.
                    raise e.advising(
                        f"{StorageOutcomeUnknown.RETRY_EXACTLY}. This call had no request_id, so a retry is a new "
                        "decision"
                    ) from e
                self.storage_failed()
                self._storage_unavailable.inc()
                allowed = self._on_storage_error == "allow"
                return pb.CheckResponse(
                    allowed=allowed,
                    reason=pb.REASON_STORAGE_UNAVAILABLE,
                    message="" if allowed else "The rate limit service cannot reach its storage; try again shortly.",
                    request_id=request_id,
                )
        self._decisions[decision.outcome].inc()
        if self._labelled is not None:
            self._labelled(model, decision.organization_id, decision.outcome)
        if decision.outcome is Outcome.PROJECT_NOT_FOUND:
            raise NotFound(f"project {caller.project_id if caller else ''} does not exist")
        return self.reply(decision, model, requests, tokens)

    @rpc
    async def ReportUsage(
        self,
        request: pb.ReportUsageRequest,
        context: grpc.aio.ServicerContext[pb.ReportUsageRequest, pb.ReportUsageResponse],
    ) -> pb.ReportUsageResponse:
        request_id = validate_request_id(request.request_id)
        caller = await self._caller(request, context)
        if caller is None:
            raise InvalidArgument("api_key is not a ratelimitd API key")
        report = await self._usage.report(
            caller,
            request_id,
            request.model,
            request.input_tokens,
            request.output_tokens,
            request.cached_tokens,
            request.status_code,
            request.latency_ms,
        )
        self._reports[report.result].inc()
        return pb.ReportUsageResponse(
            result=_RESULT[report.result],
            project_id=report.project_id,
            model=report.model,
            counted_tokens=report.counted_tokens,
            token_delta=report.token_delta,
            spend_usd=report.spend_usd,
        )

    async def _caller(
        self, request: pb.CheckRequest | pb.ReportUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Caller | None:
        which = request.WhichOneof("caller")
        if which == "api_key":
            if not request.api_key:
                raise InvalidArgument("api_key is empty")
            parsed = ids.parse_api_key_cached(request.api_key)
            return None if parsed is None else Caller(parsed.org_id, parsed.key_id, parsed.hash, "")
        if which == "project":
            principal = await self._credentials.authenticate(authorization(context))
            ref = request.project
            if not ids.is_id("org", ref.organization_id):
                raise InvalidArgument(f"project.organization_id {ref.organization_id[:80]!r} is not an org_ id")
            if not ids.is_id("proj", ref.project_id):
                raise InvalidArgument(f"project.project_id {ref.project_id[:80]!r} is not a proj_ id")
            authorize(principal, "CheckAndConsumeByProject", ref.organization_id)  # no storage call
            return Caller(ref.organization_id, "", "", ref.project_id)
        raise InvalidArgument("set either api_key or project")

    def reply(self, decision: Decision, model: str, requests: int, tokens: int) -> pb.CheckResponse:
        return pb.CheckResponse(
            allowed=decision.allowed,
            reason=_REASON[decision.outcome],
            message=refusal_message(decision, model, requests, tokens),
            binding=bucket_pb(decision.binding) if decision.binding else None,
            buckets=[bucket_pb(b) for b in decision.buckets],
            retry_after_ms=decision.retry_after_ms,
            headers=rate_limit_headers(decision, self._header_windows),
            request_id=decision.request_id,
            organization_id=decision.organization_id if decision.project_id else "",
            project_id=decision.project_id,
            replayed=decision.replayed,
        )
