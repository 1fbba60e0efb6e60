"""The hot path on a Sentinel-managed primary: one auto-pipelining connection to it.

The primary's address is asked of the sentinels (SENTINEL GET-MASTER-ADDR-BY-NAME,
the first that answers). When a call fails for storage reasons (the primary
stopped answering, or it answers READONLY because a failover made it a replica),
the call fails with StorageUnavailable as on a single server, and the sentinels
are asked again: once they name a new primary, the next calls go there.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any

from ratelimitd.core.errors import StorageUnavailable
from ratelimitd.core.scripts import LuaScript
from ratelimitd.core.storage_url import Topology
from ratelimitd.storage.pipelined import PipelinedConnection


class SentinelConnection:
    """core/scripts.py's ScriptRunner (and the health probe's ``call``) over Sentinel."""

    def __init__(self, topology: Topology, *, timeout_s: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self._topology = topology
        self._timeout = timeout_s
        self._ssl_context = ssl_context
        # sentinels speak plain RESP without the data nodes' credentials or database
        self._sentinels = [
            PipelinedConnection(
                f"{'rediss' if topology.tls else 'redis'}://{host}:{port}", timeout_s=timeout_s, ssl_context=ssl_context
            )
            for host, port in topology.nodes
        ]
        self._primary: PipelinedConnection | None = None
        self.primary_address = ""
        self._resolving: asyncio.Task[None] | None = None

    async def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        primary = await self._current()
        try:
            return await primary.run_script(script, keys, args)
        except StorageUnavailable:
            self._resolve_in_background()
            raise

    async def call(self, command: Sequence[str | int | bytes]) -> Any:
        primary = await self._current()
        try:
            return await primary.call(command)
        except StorageUnavailable:
            self._resolve_in_background()
            raise

    async def close(self) -> None:
        if self._resolving is not None:
            self._resolving.cancel()
        for connection in [*self._sentinels, *([self._primary] if self._primary else [])]:
            await connection.close()

    async def _current(self) -> PipelinedConnection:
        if self._primary is None:
            if self._resolving is None:
                self._resolving = asyncio.get_running_loop().create_task(self._resolve())
            await asyncio.shield(self._resolving)
        assert self._primary is not None
        return self._primary

    def _resolve_in_background(self) -> None:
        if self._resolving is None:
            self._resolving = asyncio.get_running_loop().create_task(self._resolve())
            self._resolving.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _resolve(self) -> None:
        try:
            address = await self._ask_sentinels()
            if address != self.primary_address or self._primary is None:
                old = self._primary
                host, _, port = address.rpartition(":")
                self._primary = PipelinedConnection(
                    self._topology.node_url(host, int(port)), timeout_s=self._timeout, ssl_context=self._ssl_context
                )
                self.primary_address = address
                if old is not None:
                    await old.close()
        finally:
            self._resolving = None

    async def _ask_sentinels(self) -> str:
        service = self._topology.service
        for sentinel in self._sentinels:
            try:
                reply = await sentinel.call(["SENTINEL", "GET-MASTER-ADDR-BY-NAME", service])
            except StorageUnavailable:
                continue
            if isinstance(reply, list) and len(reply) == 2:
                return f"{reply[0]}:{reply[1]}"
        raise StorageUnavailable(
            f"storage is unavailable: no sentinel answered with a primary for {service!r}; nothing was applied"
        )
