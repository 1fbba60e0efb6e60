"""One clock: the storage server's TIME in production, a test clock in tests.

The scripts read TIME themselves, so a decision stays one round trip and every
ratelimitd process agrees on the time. With the test clock
(RATELIMITD_MANUAL_CLOCK), the time is the value of the key ``rl:clock``
(microseconds): ratelimitd reads it and passes it to the script, which is how
refill is tested without sleeping. It is passed rather than read inside the
script because a script may only touch its organization's slot on Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from ratelimitd.core import keys
from ratelimitd.storage.redis import storage_errors

# What a script gets as its time argument: "" means "read TIME".
Clock = Callable[[], Awaitable[str]]


async def server_time() -> str:
    return ""


def manual_clock(redis: Any) -> Clock:
    """The test clock, read through the control-plane client (tests only: a second call)."""

    async def now() -> str:
        with storage_errors():
            value = await redis.get(keys.MANUAL_CLOCK)
        return str(value or 0)

    return now


async def current_month(clock: Clock, redis: Any) -> str:
    """This month, "YYYY-MM" (UTC), by the clock the scripts count spend with (storage's TIME), not ours."""
    given = await clock()
    with storage_errors():
        now_s = int(given) / 1e6 if given else (await redis.time())[0]
    return datetime.fromtimestamp(now_s, UTC).strftime("%Y-%m")
