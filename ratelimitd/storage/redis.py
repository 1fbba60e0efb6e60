"""The Redis/Valkey connection: one factory from a URL, one error mapping.

Timeouts are short and retries are off on purpose: the decision path must fail
fast with UNAVAILABLE when storage is gone rather than queue behind it, and the
connection pool reconnects by itself once storage answers again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratelimitd.engine.errors import StorageUnavailable

SUPPORTED_SCHEMES = ("redis://", "rediss://", "unix://")
T = TypeVar("T")
# Enough for any realistic burst of concurrent changes to one organization.
_TRANSACTION_ATTEMPTS = 50


def connect(url: str, *, timeout_s: float, max_connections: int = 256) -> Redis:
    if not url.startswith(SUPPORTED_SCHEMES):
        raise ValueError(f"redis URL {redact(url)!r} must start with one of {', '.join(SUPPORTED_SCHEMES)}")
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
    )


@contextmanager
def storage_errors() -> Iterator[None]:
    """Turns driver failures that mean 'storage unreachable' into StorageUnavailable."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError, TimeoutError) as e:
        # BusyLoadingError (Valkey replaying its AOF) is a ConnectionError too.
        raise StorageUnavailable(f"storage is unavailable: {type(e).__name__}") from e


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ''}***@{host}"


async def transaction(client: Redis, watch: Sequence[str], body: Callable[[Pipeline], Awaitable[T]]) -> T:
    """An optimistic check-then-write (WATCH, reads, MULTI, writes, EXEC).

    ``body`` reads through ``pipe`` (commands run at once until it calls
    ``begin_writes(pipe)``), checks, then queues its writes. EXEC applies them only if
    no watched key changed since WATCH; otherwise ``body`` runs again on fresh
    state. An error raised by ``body`` leaves storage untouched. Every watched
    key must share one hash tag (one Cluster slot).
    """
    with storage_errors():
        async with client.pipeline(transaction=True) as pipe:
            for _ in range(_TRANSACTION_ATTEMPTS):
                await pipe.watch(*watch)
                result = await body(pipe)
                try:
                    await pipe.execute()
                except redis.exceptions.WatchError:
                    continue
                return result
    raise StorageUnavailable("too many concurrent changes to the same records; try again")


def begin_writes(pipe: Pipeline) -> None:
    """Inside ``transaction``: the reads are done; what follows is queued for EXEC."""
    pipe.multi()  # type: ignore[no-untyped-call]
