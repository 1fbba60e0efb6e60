"""RateLimitService: validates input, asks the engine, builds the reply. Nothing else.

ManageProject is answered by the ProjectService servicer (api/manage.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from time import perf_counter
from typing import Any

import grpc

from ratelimitd.api.errors import STATUS, rpc
from ratelimitd.api.gate import Gate
from ratelimitd.api.manage import ProjectManager
from ratelimitd.api.metrics import Metrics
from ratelimitd.api.wellknown import micros
from ratelimitd.core.errors import (
    InvalidArgument,
    NotFound,
    RatelimitdError,
    StorageUnavailable,
)
from ratelimitd.engine import ids
from ratelimitd.engine.decisions import Caller, Decider, Item
from ratelimitd.engine.headers import rate_limit_headers
from ratelimitd.engine.limits import validate_model
from ratelimitd.engine.outcomes import (
    OUTCOMES,
    STORAGE_UNAVAILABLE,
    BucketState,
    Decision,
    Outcome,
    Scope,
    refusal_message,
)
from ratelimitd.engine.requests import validate_costs, validate_request_id
from ratelimitd.engine.storage_policy import StoragePolicy
from ratelimitd.engine.usage import ReportResult, Usage
from ratelimitd.v1 import rate_limit_service_pb2 as service_pb
from ratelimitd.v1 import rate_limit_service_pb2_grpc
from ratelimitd.v1 import ratelimit_pb2 as pb

log = logging.getLogger(__name__)

# Requests of one CheckAndConsumeStream decided at once; beyond it the stream is
# read no further until answers go out (HTTP/2 flow control holds the sender).
MAX_STREAM_IN_FLIGHT = 256

# The outcome table's reasons as enum values, looked up once here rather than per call.
_REASON = {outcome: pb.Reason.Value(rule.reason) for outcome, rule in OUTCOMES.items()}
_STORAGE_UNAVAILABLE = pb.Reason.Value(STORAGE_UNAVAILABLE.reason)


def reason_name(outcome: Outcome) -> str:
    return OUTCOMES[outcome].reason


_SCOPE = {Scope.ORGANIZATION: pb.SCOPE_ORGANIZATION, Scope.PROJECT: pb.SCOPE_PROJECT}
_RESULT = {
    ReportResult.RECONCILED: pb.ReportUsageResponse.RESULT_RECONCILED,
    ReportResult.DUPLICATE: pb.ReportUsageResponse.RESULT_DUPLICATE,
    ReportResult.UNRESERVED: pb.ReportUsageResponse.RESULT_UNRESERVED,
}


def bucket_pb(b: BucketState) -> pb.BucketStatus:
    status = pb.BucketStatus()
    fill_bucket(status, b)
    return status


def fill_bucket(status: pb.BucketStatus, b: BucketState) -> None:
    """Sets a BucketStatus (one in a reply's list: no copy) to a bucket's state."""
    status.scope = _SCOPE[b.scope]
    status.metric = b.dimension.metric
    status.window = b.dimension.window
    status.limit = b.limit
    status.remaining = b.remaining
    status.reset_after_ms = b.reset_after_ms
    if b.shadow:  # False is the default: no call to set it
        status.shadow = True


def shadow_refusal_pb(decision: Decision, model: str, requests: int, tokens: int) -> pb.ShadowRefusal | None:
    """What a shadow limit would have answered; None when none would have refused."""
    if decision.shadow_binding is None:
        return None
    enforced = decision.as_enforced()
    return pb.ShadowRefusal(
        reason=_REASON[decision.shadow_outcome],
        binding=bucket_pb(decision.shadow_binding),
        message=refusal_message(enforced, model, requests, tokens),
    )


class RateLimitServicer(rate_limit_service_pb2_grpc.RateLimitServiceServicer):
    def __init__(
        self,
        decider: Decider,
        usage: Usage,
        gate: Gate,
        header_windows: Mapping[str, str],
        on_storage_error: str,
        storage_failed: Callable[[], None],
        metrics: Metrics,
        projects: ProjectManager,
    ) -> None:
        self._projects = projects
        self._decider = decider
        self._usage = usage
        self._gate = gate
        self._header_windows = dict(header_windows)
        self._storage_policy = StoragePolicy(on_storage_error)
        self.storage_failed = storage_failed
        self._count = metrics.count_decision
        self._storage_unavailable = metrics.storage_unavailable_decisions
        self._reports = metrics.reports
        self._observe_seconds = metrics.check_seconds.observe

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
            # Timed by hand: prometheus_client's timer is an object and two calls more per decision.
            started = perf_counter()
            try:
                decision = await self._decider.check_items(caller, (Item(model, requests, tokens),), request_id)
            except StorageUnavailable as e:
                allowed = self._storage_policy.admits(e, request_id)
                self.storage_failed()
                self._storage_unavailable.inc()
                return pb.CheckResponse(
                    allowed=allowed,
                    reason=_STORAGE_UNAVAILABLE,
                    message="" if allowed else STORAGE_UNAVAILABLE.message,
                    request_id=request_id,
                )
            finally:
                self._observe_seconds(perf_counter() - started)
        self._count(decision, model)
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
            spend_usd_micros=micros(report.spend_usd),
        )

    @rpc
    async def ManageProject(
        self,
        request: service_pb.ManageProjectRequest,
        context: grpc.aio.ServicerContext[service_pb.ManageProjectRequest, service_pb.ManageProjectResponse],
    ) -> service_pb.ManageProjectResponse:
        return await self._projects.manage(request, context)

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
            ref = request.project
            await self._gate.admit_project_reference(context, ref.organization_id, ref.project_id)
            return Caller(ref.organization_id, "", "", ref.project_id)
        raise InvalidArgument("set either api_key or project")

    def reply(self, decision: Decision, model: str, requests: int, tokens: int) -> pb.CheckResponse:
        # Filled in place: a message passed to a constructor, or a dict to its map, is copied
        # once more, and this runs on every decision.
        response = pb.CheckResponse(
            allowed=decision.allowed,
            reason=_REASON[decision.outcome],
            retry_after_ms=decision.retry_after_ms,
            request_id=decision.request_id,
            organization_id=decision.organization_id if decision.project_id else "",
            project_id=decision.project_id,
            replayed=decision.replayed,
        )
        if not decision.allowed:
            response.message = refusal_message(decision, model, requests, tokens)
        if decision.binding:
            fill_bucket(response.binding, decision.binding)
        add = response.buckets.add
        for b in decision.buckets:
            fill_bucket(add(), b)
        headers = response.headers
        for name, value in rate_limit_headers(decision, self._header_windows).items():
            headers[name] = value
        shadow = shadow_refusal_pb(decision, model, requests, tokens)
        if shadow is not None:
            response.shadow_refusal.CopyFrom(shadow)
        return response
