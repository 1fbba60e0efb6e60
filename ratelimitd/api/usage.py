"""UsageService: usage queries, spend, prices, spend limits, request logs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from ratelimitd.api.decisions import reason_name
from ratelimitd.api.errors import rpc
from ratelimitd.api.wellknown import (
    MICROS_PER_USD,
    duration,
    micros,
    milliseconds,
    page,
    timestamp,
    update_paths,
)
from ratelimitd.core.errors import InvalidArgument
from ratelimitd.engine.live import LimitState, LiveState
from ratelimitd.engine.request_metrics import RequestMetrics, request_metrics
from ratelimitd.engine.usage import Price, SpendLine, Usage
from ratelimitd.engine.usage_queries import LogEntry, UsageTotals
from ratelimitd.v1 import usage_pb2 as pb
from ratelimitd.v1 import usage_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

_GRANULARITY = {pb.GRANULARITY_MINUTE: "minute", pb.GRANULARITY_HOUR: "hour", pb.GRANULARITY_DAY: "day"}
_GROUP = {pb.GROUP_BY_PROJECT: "project", pb.GROUP_BY_MODEL: "model", pb.GROUP_BY_API_KEY: "key"}
_SETTINGS_UPDATABLE = ("cached_tokens_count_toward_limits",)
_OUTCOME = {
    pb.ListRequestLogsRequest.OUTCOME_UNSPECIFIED: None,
    pb.ListRequestLogsRequest.OUTCOME_ALLOWED: True,
    pb.ListRequestLogsRequest.OUTCOME_REFUSED: False,
}


def _row(bucket_start_ms: int | None, project: str, model: str, key: str, t: UsageTotals) -> pb.UsageRow:
    """``bucket_start_ms`` None: the total, which has no bucket."""
    return pb.UsageRow(
        bucket_start_time=None if bucket_start_ms is None else timestamp(bucket_start_ms), project_id=project,
        model=model, api_key_id=key, requests=t.requests,
        refusals={reason_name(o): n for o, n in t.refusals.items()}, reported=t.reported,
        input_tokens=t.input_tokens, output_tokens=t.output_tokens, cached_tokens=t.cached_tokens,
        spend_usd_micros=micros(t.spend_usd),
        shadow_refusals={reason_name(o): n for o, n in t.shadow_refusals.items()},
    )  # fmt: skip


def _spend_line(line: SpendLine) -> pb.SpendLine:
    msg = pb.SpendLine(
        project_id=line.project_id,
        spend_usd_micros=micros(line.spend_usd),
        thresholds_crossed=line.thresholds_crossed,
        blocked=line.blocked,
    )
    if line.limit_usd is not None:
        msg.limit_usd_micros = micros(line.limit_usd)
    return msg


def _log_entry(e: LogEntry) -> pb.RequestLogEntry:
    return pb.RequestLogEntry(
        request_id=e.request_id, request_time=timestamp(e.time_ms), model=e.model, api_key_id=e.key_id,
        allowed=e.allowed,
        reason=reason_name(e.reason) if e.reason is not None else "", input_tokens=e.input_tokens,
        output_tokens=e.output_tokens, cached_tokens=e.cached_tokens, requested_tokens=e.requested_tokens,
        status_code=e.status_code, latency=duration(e.latency_ms),
        shadow_reason=reason_name(e.shadow) if e.shadow is not None else "",
    )  # fmt: skip


def _limit_state(s: LimitState) -> pb.LimitState:
    return pb.LimitState(
        model=s.model, metric=s.metric, window=s.window, organization_limit=s.organization_limit,
        organization_remaining=s.organization_remaining, project_limit=s.project_limit,
        project_remaining=s.project_remaining, remaining=s.remaining,
    )  # fmt: skip


def _metrics_row(m: RequestMetrics) -> pb.RequestMetricsRow:
    return pb.RequestMetricsRow(
        bucket_start_time=timestamp(m.bucket_start_ms), model=m.model, reported=m.reported,
        latency_p50=duration(m.p50_ms), latency_p95=duration(m.p95_ms), latency_p99=duration(m.p99_ms),
        status_codes=m.status_codes,
    )  # fmt: skip


def _price(org_id: str, p: Price) -> pb.Price:
    return pb.Price(
        organization_id=org_id, model=p.model, input_usd_micros_per_million=micros(p.input_per_million),
        output_usd_micros_per_million=micros(p.output_per_million),
        cached_input_usd_micros_per_million=micros(p.cached_input_per_million),
    )  # fmt: skip


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    """api/gate.py has authorized every call before its method runs."""

    def __init__(self, usage: Usage, storage_failed: Callable[[], None], live: LiveState) -> None:
        self.usage = usage
        self.storage_failed = storage_failed
        self.live = live

    @rpc
    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        if request.granularity not in _GRANULARITY:
            raise InvalidArgument("granularity must be MINUTE, HOUR or DAY")
        if any(g not in _GROUP for g in request.group_by):
            raise InvalidArgument("group_by must be PROJECT, MODEL or API_KEY")
        rows, total = await self.usage.query(
            request.organization_id,
            milliseconds("start_time", request.start_time, request.HasField("start_time")),
            milliseconds("end_time", request.end_time, request.HasField("end_time")),
            _GRANULARITY[request.granularity],
            [_GROUP[g] for g in request.group_by],
            request.project_id,
        )
        return pb.GetUsageResponse(rows=[_row(*r) for r in rows], total=_row(None, "", "", "", total))

    async def _spend(self, org_id: str, month: str = "") -> pb.GetSpendResponse:
        month, org, projects = await self.usage.spend(org_id, month)
        return pb.GetSpendResponse(
            organization_id=org_id,
            month=month,
            organization=_spend_line(org),
            projects=[_spend_line(p) for p in projects],
        )

    @rpc
    async def GetSpend(self, request: pb.GetSpendRequest, context: Context) -> pb.GetSpendResponse:
        return await self._spend(request.organization_id, request.month)

    @rpc
    async def SetSpendLimit(self, request: pb.SetSpendLimitRequest, context: Context) -> pb.GetSpendResponse:
        limit = request.limit_usd_micros if request.HasField("limit_usd_micros") else None
        await self.usage.set_spend_limit(request.organization_id, request.project_id, limit)
        return await self._spend(request.organization_id)

    @rpc
    async def ListRequestLogs(self, request: pb.ListRequestLogsRequest, context: Context) -> pb.ListRequestLogsResponse:
        if request.outcome not in _OUTCOME:
            raise InvalidArgument(f"outcome {request.outcome} is not an Outcome value")
        entries, token = await self.usage.logs(
            request.organization_id,
            request.project_id,
            model=request.model,
            key_id=request.api_key_id,
            allowed=_OUTCOME[request.outcome],
            start_ms=milliseconds("start_time", request.start_time, request.HasField("start_time")),
            end_ms=milliseconds("end_time", request.end_time, request.HasField("end_time")),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListRequestLogsResponse(entries=[_log_entry(e) for e in entries], next_page_token=token)

    @rpc
    async def SetPrice(self, request: pb.SetPriceRequest, context: Context) -> pb.Price:
        p = request.price
        price = Price(
            p.model,
            p.input_usd_micros_per_million / MICROS_PER_USD,
            p.output_usd_micros_per_million / MICROS_PER_USD,
            p.cached_input_usd_micros_per_million / MICROS_PER_USD,
        )
        return _price(p.organization_id, await self.usage.set_price(p.organization_id, price))

    @rpc
    async def ListPrices(self, request: pb.ListPricesRequest, context: Context) -> pb.ListPricesResponse:
        prices, token = page(
            await self.usage.prices(request.organization_id),
            lambda p: ("1" if p.model == "*" else "0") + p.model,  # the engine's order: "*" last
            request.page_size,
            request.page_token,
        )
        return pb.ListPricesResponse(prices=[_price(request.organization_id, p) for p in prices], next_page_token=token)

    @rpc
    async def SetUsageSettings(self, request: pb.SetUsageSettingsRequest, context: Context) -> pb.UsageSettings:
        settings = request.settings
        populated = {f.name for f, _ in settings.ListFields()}
        update_paths(request.update_mask, request.HasField("update_mask"), _SETTINGS_UPDATABLE, populated)
        count = await self.usage.set_cached_tokens_count(
            settings.organization_id, settings.cached_tokens_count_toward_limits
        )
        return pb.UsageSettings(organization_id=settings.organization_id, cached_tokens_count_toward_limits=count)

    @rpc
    async def GetUsageSettings(self, request: pb.GetUsageSettingsRequest, context: Context) -> pb.UsageSettings:
        count = await self.usage.cached_tokens_count(request.organization_id)
        return pb.UsageSettings(organization_id=request.organization_id, cached_tokens_count_toward_limits=count)

    @rpc
    async def GetLimitState(self, request: pb.GetLimitStateRequest, context: Context) -> pb.GetLimitStateResponse:
        now_ms, states = await self.live.read(request.organization_id, request.project_id, list(request.models))
        return pb.GetLimitStateResponse(limits=[_limit_state(s) for s in states], read_time=timestamp(now_ms))

    @rpc
    async def GetRequestMetrics(
        self, request: pb.GetRequestMetricsRequest, context: Context
    ) -> pb.GetRequestMetricsResponse:
        if request.granularity not in _GRANULARITY:
            raise InvalidArgument("granularity must be MINUTE, HOUR or DAY")
        rows, totals = await request_metrics(
            self.usage, request.organization_id, request.project_id,
            milliseconds("start_time", request.start_time, request.HasField("start_time")),
            milliseconds("end_time", request.end_time, request.HasField("end_time")),
            _GRANULARITY[request.granularity],
        )  # fmt: skip
        return pb.GetRequestMetricsResponse(
            rows=[_metrics_row(r) for r in rows], totals=[_metrics_row(t) for t in totals]
        )
