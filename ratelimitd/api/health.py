"""gRPC health, driven by the storage component.

Services reported: "" (the whole server), "storage", and each of our gRPC
services. A storage failure seen by any call turns them NOT_SERVING at once;
a background probe turns them back to SERVING when storage answers again.

The probe is a write on the hot path's connection, so health says what a decision
would find: a store that answers PING but refuses writes (a replica, a full
memory, a lost primary) is NOT_SERVING, and the probe's timeout, like a
decision's, measures storage rather than a busy event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from grpc_health.v1 import health, health_pb2

from ratelimitd.core import keys
from ratelimitd.core.errors import StorageUnavailable

log = logging.getLogger(__name__)

STORAGE = "storage"
_PROBE_TTL_MS = 60_000


class Connection(Protocol):
    """storage/pipelined.py's PipelinedConnection: raises StorageUnavailable when storage cannot be used."""

    async def call(self, command: Sequence[str | int | bytes]) -> Any: ...


class StorageHealth:
    def __init__(
        self,
        connection: Connection,
        services: list[str],
        interval_s: float,
        on_change: Callable[[bool], None] = lambda _: None,
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self._connection = connection
        self._names = ["", STORAGE, *services]
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self.serving: bool | None = None
        self._on_change = on_change

    async def _set(self, serving: bool) -> None:
        if serving == self.serving:
            return
        if self.serving is not None:
            log.warning("storage is %s", "usable again" if serving else "unavailable")
        self.serving = serving
        self._on_change(serving)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._names:
            await self.servicer.set(name, status)

    def failed(self) -> None:
        """Called by any request that saw storage fail."""
        if self.serving is not False:
            asyncio.get_running_loop().create_task(self._set(False))

    async def probe(self) -> bool:
        try:
            await self._connection.call(["SET", keys.HEALTH_PROBE, "1", "PX", _PROBE_TTL_MS])
            ok = True
        except StorageUnavailable:
            ok = False
        except Exception as e:  # noqa: BLE001 - any other failure means not serving too
            log.warning("storage health probe failed: %s", e)
            ok = False
        await self._set(ok)
        return ok

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.probe()

    async def start(self) -> None:
        await self.probe()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()
