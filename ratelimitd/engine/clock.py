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
