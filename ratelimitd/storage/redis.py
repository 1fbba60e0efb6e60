"""The Redis/Valkey connection: one factory from a URL, one error mapping.

Timeouts are short and retries are off on purpose: the decision path must fail
fast with UNAVAILABLE when storage is gone rather than queue behind it, and the
connection pool reconnects by itself once storage answers again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratelimitd.engine.errors import StorageUnavailable

SUPPORTED_SCHEMES = ("redis://", "rediss://", "unix://")


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
