"""Usage reports, prices, spend limits and spend: the reporting side of the engine.

``report`` is one call of report.lua. The spend is the monthly spend hash decide.lua
reserves in and report.lua settles; the queries of usage and logs are in
engine/usage_queries.py.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, cast

from redis.asyncio import Redis

from ratelimitd.core import keys
from ratelimitd.core.errors import FailedPrecondition, InvalidArgument, NotFound
from ratelimitd.core.retention import Retention
from ratelimitd.core.scripts import ScriptRunner
from ratelimitd.engine.clock import Clock, current_month, server_time
from ratelimitd.engine.control import ControlPlane
from ratelimitd.engine.decisions import Caller
from ratelimitd.engine.limits import MAX_LIMIT, Dimensions, validate_model
from ratelimitd.engine.replies import decode_report
from ratelimitd.engine.scripts import Scripts, configured
from ratelimitd.engine.usage_queries import UsageQueries
from ratelimitd.storage.redis import storage_errors

# Percent of a spend limit at which an alert counts as crossed.
ALERT_THRESHOLDS = (50, 75, 90, 100)
MAX_PRICE = 1_000_000.0  # USD per million tokens
MAX_SPEND_LIMIT_MICROS = 10**18  # 1e12 USD


class ReportResult(enum.IntEnum):
    """Mirrors the status report.lua answers with."""

    RECONCILED = 0
    DUPLICATE = 1
    UNRESERVED = 2


class Report(NamedTuple):
    result: ReportResult
    project_id: str
    model: str
    counted_tokens: int
    token_delta: int
    spend_usd: float


@dataclass(frozen=True)
class SpendLine:
    project_id: str  # "" for the organization
    spend_usd: float
    limit_usd: float | None

    @property
    def thresholds_crossed(self) -> list[int]:
        if self.limit_usd is None:
            return []
        if self.limit_usd == 0:
            return list(ALERT_THRESHOLDS)
        return [t for t in ALERT_THRESHOLDS if self.spend_usd >= self.limit_usd * t / 100]

    @property
    def blocked(self) -> bool:
        return self.limit_usd is not None and self.spend_usd >= self.limit_usd


class Price(NamedTuple):
    model: str
    input_per_million: float
    output_per_million: float
    cached_input_per_million: float


def _month_key(month: str) -> str:
    """'YYYY-MM' -> 'YYYYMM', validated."""
    try:
        parsed = datetime.strptime(month, "%Y-%m")
    except ValueError:
        raise InvalidArgument(f"month {month[:20]!r} is not YYYY-MM") from None
    return parsed.strftime("%Y%m")


def _nonneg(what: str, value: int, limit: int = MAX_LIMIT) -> int:
    if value < 0:
        raise InvalidArgument(f"{what} is {value}; it must be 0 or more")
    if value > limit:
        raise InvalidArgument(f"{what} is {value}; at most {limit} is allowed")
    return value


class Usage(UsageQueries):
    """Reports (report.lua), settings, prices, spend limits and spend; the queries are UsageQueries'."""

    def __init__(
        self,
        redis: Redis,
        connection: ScriptRunner,
        scripts: Scripts,
        dimensions: Dimensions,
        control: ControlPlane,
        retention: Retention,
        *,
        clock: Clock = server_time,
    ) -> None:
        super().__init__(redis, control, retention.minute_s, clock)
        self._connection = connection
        self._script = configured(scripts.report, dimensions, retention)

    # -- reporting (once per request) ------------------------------------

    async def report(
        self,
        caller: Caller,
        request_id: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int,
        status_code: int = 0,
        latency_ms: int = 0,
    ) -> Report:
        if not request_id:
            raise InvalidArgument("request_id is empty")
        if model:
            validate_model(model, wildcard=False)
        for what, value in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
            _nonneg(what, value)
        _nonneg("cached_tokens", cached_tokens)
        if cached_tokens > input_tokens:
            raise InvalidArgument(f"cached_tokens {cached_tokens} is more than input_tokens {input_tokens}")
        if not 0 <= status_code <= 999:
            raise InvalidArgument(f"status_code {status_code} is not an HTTP status")
        _nonneg("latency_ms", latency_ms, 86_400_000)
        org = keys.OrgKeys(caller.organization_id)
        kind, subject = ("k", org.api_key(caller.key_id)) if caller.key_id else ("p", org.project(caller.project_id))
        args: list[str | int] = [
            kind, caller.key_hash, caller.project_id, request_id, model, input_tokens, output_tokens, cached_tokens,
            status_code, latency_ms, await self._clock(),
        ]  # fmt: skip
        reply = decode_report(
            await self._connection.run_script(self._script, [org.state, subject, org.request(request_id)], args)
        )
        status = reply.status
        if status == 4:
            raise FailedPrecondition(
                "the API key is unknown or does not match, or it is revoked (or its project deleted) and "
                f"request {request_id} is not one it was admitted for"
            )
        if status == 5:
            raise InvalidArgument(f"request {request_id} has no reservation, so model is required")
        if status == 6:
            raise NotFound(f"project {caller.project_id} does not exist")
        if status == 7:
            raise FailedPrecondition(f"request {request_id} belongs to another project")
        if status == 8:
            raise FailedPrecondition(
                f"the usage counter {reply.model} of this project, model and key would pass 2^62 in its current "
                "minute, hour or day; the report was not recorded"
            )
        return Report(
            ReportResult(status),
            reply.project_id,
            reply.model,
            reply.counted_tokens,
            reply.token_delta,
            reply.spend_usd,
        )

    # -- settings, prices, limits ------------------------------------------

    async def set_cached_tokens_count(self, org_id: str, count: bool) -> bool:
        k = await self._control.require_organization(org_id)
        with storage_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(k.usage_settings, "cached", "1" if count else "0")
                keys.invalidate_decision_config(pipe, k)  # reports read it from the cached configuration
                await pipe.execute()
        return count

    async def cached_tokens_count(self, org_id: str) -> bool:
        k = await self._control.require_organization(org_id)
        with storage_errors():
            return bool(await self._redis.hget(k.usage_settings, "cached") == "1")

    async def set_price(self, org_id: str, price: Price) -> Price:
        validate_model(price.model, wildcard=True)
        for what, value in zip(("input", "output", "cached input"), price[1:], strict=True):
            if not math.isfinite(value) or value < 0 or value > MAX_PRICE:
                raise InvalidArgument(f"{what} price {value} must be between 0 and {MAX_PRICE:.0f} USD per million")
        k = await self._control.require_organization(org_id)
        with storage_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(k.prices, price.model, ",".join(repr(float(v)) for v in price[1:]))
                keys.invalidate_decision_config(pipe, k)  # decisions reserve spend at the price
                await pipe.execute()
        return price

    async def prices(self, org_id: str) -> list[Price]:
        k = await self._control.require_organization(org_id)
        with storage_errors():
            raw = cast(dict[str, str], await self._redis.hgetall(k.prices))
        return sorted(
            (Price(model, *(float(v) for v in value.split(","))) for model, value in raw.items()),
            key=lambda p: (p.model == "*", p.model),
        )

    async def set_spend_limit(self, org_id: str, project_id: str, limit_usd_micros: int | None) -> None:
        """``limit_usd_micros``: micro-dollars per month, or None to clear the limit."""
        if limit_usd_micros is not None and not 0 <= limit_usd_micros <= MAX_SPEND_LIMIT_MICROS:
            raise InvalidArgument(
                f"limit_usd_micros is {limit_usd_micros}; it must be between 0 and {MAX_SPEND_LIMIT_MICROS} (1e12 USD)"
            )
        if project_id:
            k = await self._control.require_project(org_id, project_id)
        else:
            k = await self._control.require_organization(org_id)
        field_ = keys.spend_field(project_id)
        with storage_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                if limit_usd_micros is None:
                    pipe.hdel(k.spend_limits, field_)
                else:
                    # stored in micro-USD, the unit report.lua adds spend in
                    pipe.hset(k.spend_limits, field_, str(limit_usd_micros))
                keys.invalidate_decision_config(pipe, k)
                await pipe.execute()

    async def spend(self, org_id: str, month: str = "") -> tuple[str, SpendLine, list[SpendLine]]:
        if month:
            _month_key(month)  # a malformed month is refused before anything is looked up
        k = await self._control.require_organization(org_id)
        month = month or await current_month(self._clock, self._redis)
        month_key = _month_key(month)
        with storage_errors():
            spent = cast(dict[str, str], await self._redis.hgetall(k.spend(month_key)))
            limits = cast(dict[str, str], await self._redis.hgetall(k.spend_limits))
        org_field = keys.spend_field("")
        org = SpendLine("", float(spent.get(org_field, 0)) / 1e6, _usd(limits.get(org_field)))
        project_ids = sorted({p for f in (*spent, *limits) if (p := keys.project_of_spend_field(f))})
        projects = [
            SpendLine(p, float(spent.get(keys.spend_field(p), 0)) / 1e6, _usd(limits.get(keys.spend_field(p))))
            for p in project_ids
        ]
        return month, org, projects


def _usd(micro: str | None) -> float | None:
    return None if micro is None else float(micro) / 1e6
