"""The hot path on a Redis/Valkey Cluster: one auto-pipelining connection per primary.

A decision's keys all carry its organization's hash tag, so its script runs on
the one primary that owns the tag's slot, in one round trip, pipelined with the
other calls to that primary in the same turn of the event loop (storage/pipelined.py).
The slot table comes from CLUSTER SLOTS, asked of any node that answers.

What the cluster answers, and what we do:

- MOVED: the slot has a new owner (a migration finished, a failover). The slot
  is pointed at the new owner at once, the whole table is reloaded in the
  background, and the call is sent again: a MOVED command was not run.
- ASK: the slot is being migrated and the call's keys are no longer on the
  source. The call goes to the target behind ASKING, on a connection of its own
  kept for that (ASKING covers only the next command, so nothing may slip in
  between).
- TRYAGAIN: a migration has some of the call's keys on each side, or (on the
  target) the call would create a key, as every decision does (its request
  record). Nothing ran; the call is sent again shortly to the same node until
  the storage timeout: once the slot is handed over it runs, otherwise it
  fails with StorageUnavailable. A decision therefore waits out the last step
  of a slot's migration; Valkey 9's atomic slot migration has no such step.
- CLUSTERDOWN, a node that does not answer or refuses (READONLY after a
  failover, LOADING, ...): StorageUnavailable at once, as on a single server
  (failure policy, health, metric), and the table is reloaded so that calls
  find the new primary by themselves once the cluster has promoted one.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis
from redis.crc import key_slot

from ratelimitd.core import keys
from ratelimitd.core.errors import StorageUnavailable
from ratelimitd.core.scripts import LuaScript
from ratelimitd.core.storage_url import Topology
from ratelimitd.storage.pipelined import PipelinedConnection
from ratelimitd.storage.redis import state_unavailable

SLOTS = 16384
# Redirections one call follows: a slot moves once per migration, and a stale table
# is fixed by the first MOVED, so more than a few means the topology keeps changing.
_MAX_REDIRECTS = 5
_TRYAGAIN_PAUSE_S = 0.005
# Background reloads of the slot table at most this often, however many calls fail.
_MIN_REFRESH_INTERVAL_S = 0.05
_CLUSTER_REPLIES = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")

Send = Callable[[PipelinedConnection], Awaitable[Any]]


def slot_of(key: str) -> int:
    return key_slot(key.encode())


class ClusterConnection:
    """core/scripts.py's ScriptRunner (and the health probe's ``call``) over a cluster."""

    def __init__(self, topology: Topology, *, timeout_s: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self._topology = topology
        self._timeout = timeout_s
        self._ssl_context = ssl_context
        self._seeds = [f"{host}:{port}" for host, port in topology.nodes]
        # slot -> "host:port" of the primary that owns it ("" for a slot no one serves)
        self._slots: list[str] | None = None
        self._connections: dict[str, PipelinedConnection] = {}
        self._asking: dict[str, tuple[PipelinedConnection, asyncio.Lock]] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        self._probe_keys: dict[str, str] = {}

    # -- ScriptRunner and call -------------------------------------------------

    async def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        slot = slot_of(keys[0])
        address = self._slots[slot] if self._slots is not None else ""
        if address:  # the common case, without the redirect machinery's frames
            reply = await self._send(address, lambda c: c.run_script(script, keys, args))
            if not isinstance(reply, hiredis.ReplyError):
                return reply
            # a redirect or a cluster state: nothing ran, so sending again is exact
            code, *rest = str(reply).split(" ")
            if code == "MOVED":
                self._slots_point(slot, _address(rest[1], address))
        return await self._routed(slot, lambda c: c.run_script(script, keys, args))

    async def call(self, command: Sequence[str | int | bytes]) -> Any:
        """One command, on the primary of its key (``command[1]``; without one, of slot 0).
        The health probe's write goes to every primary: the cluster is usable only if each
        of them is."""
        if len(command) < 2:  # no key: any primary answers for the cluster
            return await self._routed(0, lambda c: c.call(command))
        key = command[1]
        if key == keys.HEALTH_PROBE:
            return await self._probe_every_primary(command)
        text = key.decode() if isinstance(key, bytes) else str(key)
        return await self._routed(slot_of(text), lambda c: c.call(command))

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for connection in [*self._connections.values(), *(c for c, _ in self._asking.values())]:
            await connection.close()

    def primaries(self) -> list[str]:
        """The primaries' addresses as last seen (empty before the first call)."""
        return sorted(set(self._slots or ()) - {""})

    # -- routing ---------------------------------------------------------------

    async def _routed(self, slot: int, send: Send) -> Any:
        deadline = time.monotonic() + self._timeout
        ask: str | None = None
        redirects = 0
        while redirects <= _MAX_REDIRECTS:
            address = ask or await self._primary_of(slot)
            reply = await (self._send_asking(address, send) if ask else self._send(address, send))
            if not isinstance(reply, hiredis.ReplyError):
                return reply
            code, *rest = str(reply).split(" ")
            if code in ("MOVED", "ASK"):
                redirects += 1
                ask = _address(rest[1], address) if code == "ASK" else None
                if code == "MOVED":
                    self._slots_point(slot, _address(rest[1], address))
            elif code == "TRYAGAIN" and time.monotonic() + _TRYAGAIN_PAUSE_S < deadline:
                # The same node again (behind ASKING if it is the target): a migration in
                # progress ends with the slot handed over, and then this call runs there.
                await asyncio.sleep(_TRYAGAIN_PAUSE_S)
            else:  # CLUSTERDOWN, or TRYAGAIN for longer than the storage timeout
                self._schedule_refresh()
                raise state_unavailable(code)
        self._schedule_refresh()
        raise StorageUnavailable("storage is unavailable: the cluster keeps moving this slot; nothing was applied")

    async def _send(self, address: str, send: Send) -> Any:
        try:
            return await send(self._connection(address))
        except StorageUnavailable:
            self._schedule_refresh()  # a failover: the next calls look for the new primary
            raise

    async def _send_asking(self, address: str, send: Send) -> Any:
        if address not in self._asking:
            self._asking[address] = (self._new_connection(address), asyncio.Lock())
        connection, lock = self._asking[address]
        async with lock:
            try:
                await connection.call(["ASKING"])
                return await send(connection)
            except StorageUnavailable:
                self._schedule_refresh()
                raise

    def _connection(self, address: str) -> PipelinedConnection:
        if address not in self._connections:
            self._connections[address] = self._new_connection(address)
        return self._connections[address]

    def _new_connection(self, address: str) -> PipelinedConnection:
        host, _, port = address.rpartition(":")
        return PipelinedConnection(
            self._topology.node_url(host, int(port)),
            timeout_s=self._timeout,
            ssl_context=self._ssl_context,
            passthrough=_CLUSTER_REPLIES,
        )

    async def _probe_every_primary(self, command: Sequence[str | int | bytes]) -> Any:
        if self._slots is None:
            await self._refresh_now()
        if "" in (self._slots or ()):
            # slots no one served at the last look: the probe is the periodic look again
            self._schedule_refresh()
        replies = await asyncio.gather(
            *(self._probe(address, command) for address in self.primaries()),
        )
        return replies[0] if replies else None

    async def _probe(self, address: str, command: Sequence[str | int | bytes]) -> Any:
        key = self._probe_key(address)
        return await self._routed(slot_of(key), lambda c: c.call([command[0], key, *command[2:]]))

    def _probe_key(self, address: str) -> str:
        """A health probe key whose slot this primary owns."""
        if address not in self._probe_keys:
            owned = self._slots or []
            for n in itertools.count():
                key = keys.health_probe_on(n)
                if owned[slot_of(key)] == address:
                    self._probe_keys[address] = key
                    break
        return self._probe_keys[address]

    # -- the slot table ----------------------------------------------------------

    async def _primary_of(self, slot: int) -> str:
        if self._slots is None:
            await self._refresh_now()
        assert self._slots is not None
        address = self._slots[slot]
        if not address and time.monotonic() - self._refreshed_at >= _MIN_REFRESH_INTERVAL_S:
            await self._refresh_now()  # a slot served again since the last look is used at once
            address = self._slots[slot]
        if not address:
            raise StorageUnavailable(
                f"storage is unavailable: no cluster node serves slot {slot} (CLUSTERDOWN); nothing was applied"
            )
        return address

    def _slots_point(self, slot: int, address: str) -> None:
        if self._slots is not None:
            self._slots[slot] = address
        self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        if self._refreshing is not None or time.monotonic() - self._refreshed_at < _MIN_REFRESH_INTERVAL_S:
            return
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        # nobody awaits a background reload: the next call that needs it tries again
        self._refreshing.add_done_callback(_consume_failure)

    async def _refresh_now(self) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        try:
            self._slots = await self._load_slots()
            self._probe_keys.clear()
        finally:
            self._refreshed_at = time.monotonic()
            self._refreshing = None

    async def _load_slots(self) -> list[str]:
        """The table from the first node that answers CLUSTER SLOTS: the primaries last
        seen, then the URL's nodes."""
        failure: StorageUnavailable | None = None
        for address in dict.fromkeys([*self.primaries(), *self._seeds]):
            try:
                reply = await self._connection(address).call(["CLUSTER", "SLOTS"])
            except StorageUnavailable as e:
                failure = e
                continue
            if isinstance(reply, list):
                return _slot_table(reply, address)
        raise StorageUnavailable(
            "storage is unavailable: no cluster node answered CLUSTER SLOTS; nothing was applied"
        ) from failure


def _consume_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _slot_table(reply: list[Any], asked: str) -> list[str]:
    table = [""] * SLOTS
    for start, end, primary, *_replicas in reply:
        address = _address(f"{primary[0]}:{primary[1]}", asked)
        table[start : end + 1] = [address] * (end + 1 - start)
    return table


def _address(text: str, asked: str) -> str:
    """A node's "host:port" as the cluster names it; an empty or unknown host ("" or "?")
    means the host of the node that answered."""
    host, _, port = text.rpartition(":")
    if host in ("", "?"):
        host = asked.rpartition(":")[0]
    return f"{host}:{port}"
