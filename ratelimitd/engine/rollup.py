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

from ratelimitd.core import keys
from ratelimitd.core.retention import Retention
from ratelimitd.engine.clock import Clock, server_time
from ratelimitd.engine.limits import Dimensions
from ratelimitd.engine.scripts import Scripts, configured
from ratelimitd.storage.redis import storage_errors

log = logging.getLogger(__name__)

# A script blocks Valkey while it runs, so each call is bounded (rollup.lua): a
# minute of at most WHOLE_MINUTE_FIELDS fields is rolled in one call, a larger one
# IDS_PER_CALL usage ids (project, model, key) at a time.
WHOLE_MINUTE_FIELDS = 1000
IDS_PER_CALL = 200


class UsageRollup:
    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        dimensions: Dimensions,
        retention: Retention,
        *,
        clock: Clock = server_time,
    ) -> None:
        self._redis = redis
        # redis-py's connection pool, not the hot path's pipelined connection: decisions
        # queue behind no rollup in the client
        self._script = redis.register_script(configured(scripts.rollup, dimensions, retention).source)
        self._clock = clock

    async def roll(self, org_id: str) -> int:
        """Rolls every finished minute of one organization; returns how many script calls it took
        (1: there was nothing, or one small minute, to roll)."""
        calls = 1
        while not await self.step(org_id):
            calls += 1
        return calls

    async def step(
        self, org_id: str, whole_minute_fields: int = WHOLE_MINUTE_FIELDS, ids_per_call: int = IDS_PER_CALL
    ) -> bool:
        """One bounded call of rollup.lua; True once every finished minute is rolled up."""
        marker = keys.OrgKeys(org_id).usage_rollup_marker
        args: list[str | int] = [whole_minute_fields, ids_per_call, await self._clock()]
        with storage_errors():
            done, _ = await self._script(keys=[marker], args=args, client=self._redis)
        return bool(int(done))

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
