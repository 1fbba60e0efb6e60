"""An auto-pipelining connection for the hot path's script calls.

Calls are batched: while one batch of commands is in storage, the calls that
arrive meanwhile wait in an outbox, and the moment the batch's last reply is
read they go out together in one write. With no concurrency a call is written at
once and costs what a plain call costs; under load, concurrent decisions share
one write, one read and one wake-up of storage instead of a system call pair
each, which is most of what a call to storage costs the server. Storage runs
commands one after the other anyway, so waiting for the batch ahead adds no
queueing that storage would not impose.

Replies are read in the transport's callback (an asyncio Protocol, not a stream
and a reader task): a reply resolves its call in the same turn of the event loop
in which its bytes arrive, with no task in between.

Failure is fast and shared: when the batch in storage has waited longer than
the timeout, or the connection breaks, every waiting call fails with
StorageUnavailable and the next call reconnects. A reply that describes the
server's state (LOADING, READONLY, OOM, BUSY, MASTERDOWN, NOAUTH, see
storage/redis.py STORAGE_STATES) is an outage too, and the connection is
rebuilt. Scripts run as FUNCTIONs (core/scripts.py LuaScript): "Function not
found" (a new, restarted or flushed server) is answered by loading the library
and retrying once; a server without functions gets EVALSHA, and NOSCRIPT the
same load-and-retry.

The timeout measures storage, not us: a batch's clock starts when it is written,
calls waiting in the outbox are not in storage yet, and the watchdog never
judges on the turn it wakes up: a loop that was busy (timers run before the loop
reads its sockets) may have replies sitting unread, so an overdue batch is
judged again once the socket has been read.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url

from ratelimitd.core.errors import StorageOutcomeUnknown, StorageUnavailable
from ratelimitd.core.scripts import LuaScript
from ratelimitd.storage.redis import state_unavailable, storage_state

# A watchdog this late was held up by a busy event loop, not by storage.
_LATE_S = 0.01
# How long the watchdog lets the loop read the socket before it judges (again),
# and how many times in a row a late watchdog may wait (so a loop that stays
# overloaded still fails calls to a dead storage, only later).
_CATCH_UP_S = 0.005
_MAX_CATCH_UPS = 50


# The error replies of FCALL to a server that lacks the function, and of a server
# that has no functions at all (before Redis 7: "unknown command 'FCALL'").
_NO_FUNCTION = "ERR Function not found"
_NO_FUNCTIONS = "ERR unknown command"


class ScriptError(Exception):
    """A script failed inside the server: a bug, not an outage."""


class _Link(asyncio.Protocol):
    """One connection's transport callbacks, handed to the PipelinedConnection that owns it."""

    def __init__(self, owner: PipelinedConnection) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.owner._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self)


class PipelinedConnection:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
        passthrough: tuple[str, ...] = (),
    ) -> None:
        """``ssl_context``: for rediss:// (default: the system's CAs). ``passthrough``: error
        replies starting with one of these are returned, not raised, and leave the connection
        alone (storage/cluster.py reads MOVED, ASK, TRYAGAIN and CLUSTERDOWN itself)."""
        self._options: dict[str, Any] = dict(parse_url(url))
        self._tls = url.startswith("rediss://")
        self._ssl_context = ssl_context
        self._passthrough = passthrough
        self._timeout = timeout_s
        self._link: _Link | None = None
        self._parser = hiredis.Reader(encoding="utf-8", errors="replace")
        self._connecting: asyncio.Future[None] | None = None
        self._outbox: list[bytes] = []
        # Every unanswered call, in the order the server answers: the first
        # ``_in_flight`` were written (one batch, at ``_sent_at``), the rest wait in the outbox.
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._in_flight = 0
        self._sent_at = 0.0
        self._batch = 0  # batches written so far: which batch the watchdog suspects
        self._suspect = -1
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._catch_ups = 0
        self._functions = True  # until the server says it has none

    # -- public ----------------------------------------------------------------

    async def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        if self._functions:
            try:
                # REPLACE: calls that met the same miss load the same text at the same time
                load = ("FUNCTION", "LOAD", "REPLACE", script.library)
                return await self._loading(("FCALL", script.function, len(keys), *keys, *args), _NO_FUNCTION, load)
            except ScriptError as e:
                if not str(e).startswith(_NO_FUNCTIONS):
                    raise
                self._functions = False  # a server before functions (Redis 6): scripts it is
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        return await self._loading(command, "NOSCRIPT", ("SCRIPT", "LOAD", script.source))

    async def _loading(self, command: Sequence[str | int], missing: str, load: Sequence[str]) -> Any:
        """The command; when the server answers that it lacks the code (``missing``), ``load``
        and the command once more."""
        try:
            return await self.call(command)
        except ScriptError as e:
            if not str(e).startswith(missing):
                raise
        await self.call(load)
        return await self.call(command)

    async def call(self, command: Sequence[str | int | bytes]) -> Any:
        if self._link is None:
            await self._connect()
        link = self._link
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # hiredis's stub types the argument as a 1-tuple; it takes any tuple of str, int, float, bytes.
        self._outbox.append(hiredis.pack_command(tuple(command)))  # type: ignore[arg-type]
        self._waiting.append(future)
        if not self._in_flight and not self._flush_scheduled:
            # Commands issued in this turn of the loop go out together.
            self._flush_scheduled = True
            future.get_loop().call_soon(self._flush)
        reply = await future
        if isinstance(reply, hiredis.ReplyError):
            if self._passthrough and str(reply).startswith(self._passthrough):
                return reply
            code = storage_state(str(reply))
            if code is not None:
                # The state belongs to the server, but a new connection re-authenticates
                # and re-resolves the host (a failover); calls behind this one fail too.
                if self._link is link:
                    self._fail(StorageOutcomeUnknown("the storage connection was reset"))
                raise state_unavailable(code)
            raise ScriptError(str(reply))
        return reply

    async def close(self) -> None:
        self._fail(StorageUnavailable("storage connection closed"))

    # -- connection ------------------------------------------------------------

    async def _connect(self) -> None:
        # One connect at a time; calls that arrive meanwhile wait for it.
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        self._connecting = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._open(), self._timeout)
            self._connecting.set_result(None)
        except StorageUnavailable as e:  # the AUTH or SELECT was refused (WRONGPASS, LOADING, ...)
            self._connecting.set_exception(e)
            self._connecting.exception()
            raise
        except (OSError, TimeoutError, ScriptError) as e:
            error = StorageUnavailable(f"storage is unavailable: cannot connect ({_connect_failure(e)})")
            self._connecting.set_exception(error)
            self._connecting.exception()  # retrieved: waiters get it through shield
            raise error from e
        finally:
            self._connecting = None

    async def _open(self) -> None:
        o = self._options
        loop = asyncio.get_running_loop()
        link = _Link(self)
        if "path" in o:
            await loop.create_unix_connection(lambda: link, o["path"])
        else:
            host = o.get("host", "localhost")
            context = (self._ssl_context or ssl.create_default_context()) if self._tls else None
            await loop.create_connection(
                lambda: link, host, o.get("port", 6379), ssl=context, server_hostname=host if context else None
            )
        self._parser = hiredis.Reader(encoding="utf-8", errors="replace")
        self._link = link
        if o.get("password"):
            auth = ["AUTH", o["username"], o["password"]] if o.get("username") else ["AUTH", o["password"]]
            await self.call(auth)
        if o.get("db"):
            await self.call(["SELECT", o["db"]])

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outbox and not self._in_flight:
            self._write()

    def _write(self) -> None:
        """Writes the outbox as one batch (nothing else is in flight)."""
        link = self._link
        if link is None or link.transport is None or link.transport.is_closing():
            self._fail(StorageUnavailable("storage connection lost"))
            return
        link.transport.write(b"".join(self._outbox))
        self._in_flight = len(self._outbox)
        self._outbox.clear()
        self._sent_at = time.monotonic()
        self._batch += 1
        if self._watchdog is None:
            self._arm_watchdog(self._timeout)

    def _received(self, link: _Link, data: bytes) -> None:
        if link is not self._link:
            return  # a connection already given up
        parser = self._parser
        waiting = self._waiting
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                future = waiting.popleft()
                self._in_flight -= 1
                if not future.done():
                    future.set_result(reply)
        except (IndexError, hiredis.ProtocolError) as e:
            self._fail(StorageOutcomeUnknown(_broke(e)))
            return
        if not self._in_flight and self._outbox:
            self._write()

    def _lost(self, link: _Link) -> None:
        if link is self._link:
            self._fail(StorageOutcomeUnknown("the storage connection broke (closed by storage)"))

    # -- the watchdog -----------------------------------------------------------

    def _arm_watchdog(self, delay: float) -> None:
        due = time.monotonic() + delay
        self._watchdog = asyncio.get_running_loop().call_later(delay, self._check_deadline, due)

    def _check_deadline(self, due: float) -> None:
        self._watchdog = None
        if not self._in_flight:
            self._suspect = -1
            return
        now = time.monotonic()
        if now - due > _LATE_S and self._catch_ups < _MAX_CATCH_UPS:
            # The loop was busy: replies may have arrived meanwhile, unread. Judge
            # again once the socket has been read.
            self._catch_ups += 1
            self._arm_watchdog(_CATCH_UP_S)
            return
        self._catch_ups = 0
        age = now - self._sent_at
        if age < self._timeout:
            self._suspect = -1
            self._arm_watchdog(self._timeout - age)
        elif self._suspect != self._batch:
            # Overdue as far as this turn knows; timers run before the loop reads its
            # sockets, so the answer may be waiting there. Look again after a read.
            self._suspect = self._batch
            self._arm_watchdog(_CATCH_UP_S)
        else:
            self._fail(StorageOutcomeUnknown(f"storage did not answer within {round(self._timeout * 1000)} ms"))

    def _fail(self, error: StorageUnavailable) -> None:
        """Fails every waiting call and drops the connection; the next call reconnects.

        ``error`` is for the calls already written; those still in the outbox never
        reached storage and are told so."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        link, self._link = self._link, None
        if link is not None and link.transport is not None:
            link.transport.close()
        self._outbox.clear()
        self._catch_ups = 0
        self._suspect = -1
        sent, self._in_flight = self._in_flight, 0
        unsent = StorageUnavailable("storage is unavailable: the connection was lost; nothing was applied")
        waiting = self._waiting
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_exception(error if sent > 0 else unsent)
            sent -= 1


def _broke(error: Exception) -> str:
    """Why the connection broke, in words (no exception class names reach a caller)."""
    if isinstance(error, hiredis.ProtocolError):
        return "the storage connection broke (a reply that is not RESP)"
    return "the storage connection broke"


def _connect_failure(error: Exception) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return "the handshake failed"
