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

from ratelimitd.core.errors import StorageUnavailable
from ratelimitd.core.storage_url import StorageTls, parse
from ratelimitd.storage.topology import control_plane_client

# Error replies that describe the storage server's state rather than our command:
# the same command succeeds once the state passes, so they are outages (the failure
# policy, health and the metric apply), not bugs. Each refuses the command before it
# changes anything: a script is refused at its first write (Valkey checks OOM and a
# replica's READONLY there), and every script of ours writes. Anything else a script
# replies (a Lua error) is a bug and stays one.
STORAGE_STATES = {
    "LOADING": "it is loading its data after a restart",
    "READONLY": "it is a read-only replica",
    "MASTERDOWN": "it is a replica that lost its primary",
    "OOM": "it is out of memory (maxmemory reached)",
    "BUSY": "it is busy running a long script",
    "NOAUTH": "it requires a password the storage URL does not give",
    "WRONGPASS": "it rejected the password of the storage URL",
    "NOPERM": "its ACL user lacks a permission",
    "MISCONF": "it cannot persist its data and refuses writes",
    "NOREPLICAS": "it has too few replicas to accept writes",
    "TRYAGAIN": "its cluster is moving the data",
    "CLUSTERDOWN": "its cluster is down",
}
# redis-py raises these classes for some of the codes above, with the code removed
# from the message.
_STATE_CLASSES: tuple[tuple[type[Exception], str], ...] = (
    (redis.exceptions.BusyLoadingError, "LOADING"),
    (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.MasterDownError, "MASTERDOWN"),
    (redis.exceptions.OutOfMemoryError, "OOM"),
    (redis.exceptions.NoPermissionError, "NOPERM"),
    (redis.exceptions.AuthenticationError, "NOAUTH"),
    (redis.exceptions.TryAgainError, "TRYAGAIN"),
    (redis.exceptions.ClusterDownError, "CLUSTERDOWN"),
)


def state_unavailable(code: str) -> StorageUnavailable:
    return StorageUnavailable(f"storage is unavailable: {STORAGE_STATES[code]} ({code}); nothing was applied")


# What a server that wants a password answers a long command (a script call) from a
# connection that has not authenticated, instead of NOAUTH; it then closes it.
_UNAUTHENTICATED_PROTOCOL_ERROR = "ERR Protocol error: unauthenticated"


def storage_state(reply: str) -> str | None:
    """The STORAGE_STATES code an error reply starts with, if any."""
    if reply.startswith(_UNAUTHENTICATED_PROTOCOL_ERROR):
        return "NOAUTH"
    code = reply.split(" ", 1)[0]
    return code if code in STORAGE_STATES else None


def _state_of(error: Exception) -> str | None:
    for cls, code in _STATE_CLASSES:
        if isinstance(error, cls):
            return code
    return storage_state(str(error)) if isinstance(error, redis.exceptions.ResponseError) else None


T = TypeVar("T")
# Enough for any realistic burst of concurrent changes to one organization.
_TRANSACTION_ATTEMPTS = 50


def connect(url: str, *, timeout_s: float, max_connections: int = 256, tls: StorageTls | None = None) -> Redis:
    """redis-py's client for the storage the URL names (one server, a Cluster or a
    Sentinel-managed primary: storage/topology.py)."""
    return control_plane_client(
        parse(url), timeout_s=timeout_s, tls=tls or StorageTls(), max_connections=max_connections
    )


@contextmanager
def storage_errors() -> Iterator[None]:
    """Turns driver failures that mean 'storage unreachable or not usable now' into
    StorageUnavailable: no connection, no answer in time, or a STORAGE_STATES reply."""
    try:
        yield
    except (redis.exceptions.TimeoutError, TimeoutError) as e:
        raise StorageUnavailable(
            "storage did not answer in time; a change this call asked for may have been applied"
        ) from e
    except (redis.exceptions.ConnectionError, ConnectionError, redis.exceptions.ResponseError) as e:
        code = _state_of(e)
        if code is not None:
            raise state_unavailable(code) from e
        if isinstance(e, redis.exceptions.ResponseError):
            raise
        raise StorageUnavailable("storage is unavailable: cannot connect or the connection broke") from e


async def transaction(client: Redis, watch: Sequence[str], body: Callable[[Pipeline], Awaitable[T]]) -> T:
    """An optimistic check-then-write (WATCH, reads, MULTI, writes, EXEC).

    ``body`` reads through ``pipe`` (commands run at once until it calls
    ``begin_writes(pipe)``), checks, then queues its writes. EXEC applies them only if
    no watched key changed since WATCH; otherwise ``body`` runs again on fresh
    state. An error raised by ``body`` leaves storage untouched. Every watched
    key must share one hash tag (one Cluster slot).
    """
    cluster = client if hasattr(client, "node_client") else None
    with storage_errors():
        node = cluster.node_client(watch[0]) if cluster is not None else client
        try:
            async with node.pipeline(transaction=True) as pipe:
                for _ in range(_TRANSACTION_ATTEMPTS):
                    await pipe.watch(*watch)
                    result = await body(pipe)
                    try:
                        await pipe.execute()
                    except redis.exceptions.WatchError:
                        continue
                    return result
        except redis.exceptions.ResponseError as e:
            if cluster is None or not str(e).startswith(("MOVED", "ASK")):
                raise
            # The slot moved (a migration or a failover): nothing was applied. The cluster
            # client reloads its map before its next call, which finds the new owner.
            cluster.topology_changed()  # type: ignore[attr-defined]
            raise StorageUnavailable("the organization's storage slot is moving; nothing was applied, try again") from e
    raise StorageUnavailable("too many concurrent changes to the same records; try again")


async def key_exists(pipe: Pipeline, key: str) -> bool:
    """EXISTS in ``transaction``'s read phase, on every topology: redis-py's cluster
    pipeline splits ``exists()`` by slot and, while watching, never runs it (it returns
    the pipeline itself, which is truthy)."""
    return bool(await pipe.execute_command("EXISTS", key))


def begin_writes(pipe: Pipeline) -> None:
    """Inside ``transaction``: the reads are done; what follows is queued for EXEC."""
    pipe.multi()  # type: ignore[no-untyped-call]
