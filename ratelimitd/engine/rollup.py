"""Rolls finished minutes of usage up into hours and days (rollup.lua), in the background.

Decisions and reports count usage only per minute; this adds each finished
minute to the hour and day counters, one organization at a time. Every process
runs the loop: the script is atomic and idempotent (a marker per organization
says how far it got), so two processes rolling the same organization count
nothing twice, and queries add the minutes not rolled yet (engine/usage.py), so
the answers are exact whether the loop has run or not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from redis.asyncio import Redis

from ratelimitd.engine import keys
from ratelimitd.engine.clock import Clock, server_time
from ratelimitd.engine.limits import Dimensions
from ratelimitd.engine.retention import Retention
from ratelimitd.engine.scripts import ScriptRunner, Scripts, configured
from ratelimitd.storage.redis import storage_errors

log = logging.getLogger(__name__)

# Minutes one script call rolls at most: a call stays short even for an
# organization whose rollup is hours behind; the loop calls again.
MINUTES_PER_CALL = 240


class UsageRollup:
    def __init__(
        self,
        redis: Redis,
        connection: ScriptRunner,
        scripts: Scripts,
        dimensions: Dimensions,
        retention: Retention,
        *,
        clock: Clock = server_time,
    ) -> None:
        self._redis = redis
        self._connection = connection
        self._script = configured(scripts.rollup, dimensions, retention)
        self._clock = clock

    async def roll(self, org_id: str) -> int:
        """Rolls every finished minute of one organization; returns how many minutes it went through."""
        marker = keys.OrgKeys(org_id).usage_rollup_marker
        total = 0
        while True:
            rolled, _ = await self._connection.evalsha(self._script, [marker], [MINUTES_PER_CALL, await self._clock()])
            total += int(rolled)
            if int(rolled) < MINUTES_PER_CALL:
                return total

    async def roll_all(self) -> int:
        total = 0
        async for org_id, _ in self._redis.hscan_iter(keys.ORGANIZATIONS):
            total += await self.roll(cast(str, org_id))
        return total

    async def run(self, interval_s: float) -> None:
        """Rolls every organization each ``interval_s``, first after one interval, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                with storage_errors():
                    await self.roll_all()
            except Exception as e:  # noqa: BLE001 - the loop outlives any one round
                # the next round catches up: the marker stays where the last call left it
                log.warning("usage rollup paused: %s: %s", type(e).__name__, e)
