"""Spend alerts: which thresholds of a monthly spend limit were crossed, each claimed once.

The spend a scope has this month (as GetSpend shows it: reported cost plus the
estimates of requests not reported yet) is compared with its limit at 50, 75, 90
and 100 percent by spend_alerts.lua, one call per organization, off the hot path
(a periodic scan, not a decision's round trip). The script claims each threshold
crossed for the first time this month, in storage, so several ratelimitd
processes scanning the same organization claim it once between them, and it
appends the crossing to the organization's audit trail in the same step.
Delivering a claimed alert (alerts.py) and recording how that went are the
caller's; a claimed alert is not claimed again, even if its delivery never ends.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

from redis.asyncio import Redis

from ratelimitd.core import keys
from ratelimitd.engine.audit import Audit, actor_json
from ratelimitd.engine.authz import INTERNAL
from ratelimitd.engine.clock import Clock, current_month, server_time
from ratelimitd.engine.scripts import read_script
from ratelimitd.engine.usage import ALERT_THRESHOLDS
from ratelimitd.storage.redis import storage_errors

# Claims outlive their month by this much: a scan just after midnight of the 1st
# must still find last month's claims (its spend hash is still read by then).
_CLAIMS_TTL_S = 40 * 86400


class SpendCrossing(NamedTuple):
    organization_id: str
    project_id: str  # "" for the organization's own limit
    month: str  # YYYY-MM, UTC
    threshold: int  # percent of the limit
    spend_usd: float
    limit_usd: float

    @property
    def alert_id(self) -> str:
        """One per scope, month and threshold: what receivers deduplicate on."""
        return f"{self.organization_id}:{self.project_id or '-'}:{self.month}:{self.threshold}"


class SpendAlerts:
    def __init__(self, redis: Redis, audit: Audit, *, clock: Clock = server_time) -> None:
        self._redis = redis
        self._audit = audit
        self._clock = clock
        self._script = redis.register_script(read_script("spend_alerts"))

    async def claim(self, org_id: str, month: str = "") -> list[SpendCrossing]:
        """The thresholds of one organization crossed this month (or ``month``) and not claimed before."""
        month = month or await current_month(self._clock, self._redis)
        month_key = month.replace("-", "")
        k = keys.OrgKeys(org_id)
        args: list[str | int] = [
            _CLAIMS_TTL_S, self._audit.max_events, actor_json(INTERNAL), month, len(ALERT_THRESHOLDS),
            *ALERT_THRESHOLDS,
        ]  # fmt: skip
        with storage_errors():
            reply = cast(
                list[Any],
                await self._script(
                    keys=[k.spend_limits, k.spend(month_key), k.spend_alerts(month_key), k.audit],
                    args=args,
                    client=self._redis,
                ),
            )
        return [
            SpendCrossing(
                org_id, str(field).removeprefix("p:") if field != "o" else "", month, int(percent),
                float(spent) / 1e6, float(limit) / 1e6,
            )
            for field, percent, spent, limit in zip(*[iter(reply)] * 4, strict=True)
        ]  # fmt: skip

    async def claim_all(self) -> list[SpendCrossing]:
        """Every organization's new crossings this month. A scan that storage fails ends there
        (StorageUnavailable); what it did not reach, the next scan claims."""
        month = await current_month(self._clock, self._redis)
        crossings: list[SpendCrossing] = []
        with storage_errors():
            async for org_id, _ in self._redis.hscan_iter(keys.ORGANIZATIONS):
                crossings += await self.claim(cast(str, org_id), month)
        return crossings

    async def record_delivery(self, crossing: SpendCrossing, *, delivered: bool, attempts: int, result: str) -> None:
        """The delivery's outcome in the organization's audit trail ("SpendAlertDelivered" or
        "SpendAlertFailed"): the alert, how many tries, and the receiver's last answer."""
        k = keys.OrgKeys(crossing.organization_id)
        with storage_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                self._audit.append(
                    pipe, k.audit, INTERNAL, "SpendAlertDelivered" if delivered else "SpendAlertFailed",
                    crossing.project_id or "organization", project_id=crossing.project_id,
                    after={"alert_id": crossing.alert_id, "threshold": crossing.threshold, "month": crossing.month,
                           "attempts": attempts, "result": result},
                )  # fmt: skip
                await pipe.execute()
