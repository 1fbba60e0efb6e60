"""An auto-pipelining connection for the hot path's script calls.

Every command issued in one turn of the event loop goes out in one write on one
connection, and the replies come back in order through one hiredis parser. Under
load, concurrent decisions share round trips and system calls instead of each
taking a pooled connection, packing, writing and reading on its own; with no
concurrency it costs what a plain call costs.

Failure is fast and shared: when the oldest unanswered command has waited on
storage longer than the timeout, or the connection breaks, every waiting call
fails with StorageUnavailable and the next call reconnects. A reply that
describes the server's state (LOADING, READONLY, OOM, BUSY, MASTERDOWN, NOAUTH,
see storage/redis.py STORAGE_STATES) is an outage too, and the connection is
rebuilt. NOSCRIPT (a new or restarted server) is answered by loading the script
and retrying once.

The timeout measures storage, not us: a command's clock starts when it is
written, and a watchdog that runs late (the event loop was busy, so replies may
be sitting unread in the socket) lets the reader catch up before judging.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import ssl
import time
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url

from ratelimitd.engine.errors import StorageOutcomeUnknown, StorageUnavailable
from ratelimitd.engine.scripts import LuaScript
from ratelimitd.storage.redis import state_unavailable, storage_state

# A watchdog this late was held up by a busy event loop, not by storage.
_LATE_S = 0.01
# How long a late watchdog lets the reader catch up before judging again, and how
# many times in a row it may do so (so a loop that stays overloaded still fails
# calls to a dead storage, only later).
_CATCH_UP_S = 0.005
_MAX_CATCH_UPS = 50


class ScriptError(Exception):
    """A script failed inside the server: a bug, not an outage."""


class _Pending:
    """A command in flight: its caller's future, and when it was written (0: not yet)."""

    __slots__ = ("future", "sent_at")

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future
        self.sent_at = 0.0


def _encode(args: Sequence[str | int | bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


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
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._outbox: list[bytes] = []
        # commands in flight, in the order the server answers
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._catch_ups = 0
        self._read_task: asyncio.Task[None] | None = None

    # -- public ----------------------------------------------------------------

    async def evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        command = ["EVALSHA", script.sha, len(keys), *keys, *args]
        try:
            return await self.call(command)
        except ScriptError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        await self.call(["SCRIPT", "LOAD", script.source])
        return await self.call(command)

    async def call(self, command: Sequence[str | int | bytes]) -> Any:
        if self._writer is None or self._writer.is_closing():
            await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        connection = self._writer
        self._outbox.append(_encode(command))
        self._waiting.append(_Pending(future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        reply = await future
        if isinstance(reply, hiredis.ReplyError):
            if self._passthrough and str(reply).startswith(self._passthrough):
                return reply
            code = storage_state(str(reply))
            if code is not None:
                # The state belongs to the server, but a new connection re-authenticates
                # and re-resolves the host (a failover); calls behind this one fail too.
                if self._writer is connection:
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
            error = StorageUnavailable(f"storage is unavailable: cannot connect ({type(e).__name__})")
            self._connecting.set_exception(error)
            self._connecting.exception()  # retrieved: waiters get it through shield
            raise error from e
        finally:
            self._connecting = None

    async def _open(self) -> None:
        o = self._options
        if "path" in o:
            reader, writer = await asyncio.open_unix_connection(o["path"])
        else:
            context = (self._ssl_context or ssl.create_default_context()) if self._tls else None
            reader, writer = await asyncio.open_connection(o.get("host", "localhost"), o.get("port", 6379), ssl=context)
        self._reader, self._writer = reader, writer
        self._parser = hiredis.Reader(encoding="utf-8", errors="replace")
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(reader))
        if o.get("password"):
            auth = ["AUTH", o["username"], o["password"]] if o.get("username") else ["AUTH", o["password"]]
            await self.call(auth)
        if o.get("db"):
            await self.call(["SELECT", o["db"]])

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox:
            return
        writer = self._writer
        if writer is None or writer.is_closing():
            self._fail(StorageUnavailable("storage connection lost"))
            return
        writer.write(b"".join(self._outbox))
        now = time.monotonic()
        for pending in itertools.islice(reversed(self._waiting), len(self._outbox)):
            pending.sent_at = now
        self._outbox.clear()
        if self._watchdog is None:
            self._arm_watchdog(self._timeout)

    def _arm_watchdog(self, delay: float) -> None:
        due = time.monotonic() + delay
        self._watchdog = asyncio.get_running_loop().call_later(delay, self._check_deadline, due)

    def _check_deadline(self, due: float) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        now = time.monotonic()
        if now - due > _LATE_S and self._catch_ups < _MAX_CATCH_UPS:
            # The loop was busy: replies may have arrived meanwhile, unread. Judge
            # again once the reader has run.
            self._catch_ups += 1
            self._arm_watchdog(_CATCH_UP_S)
            return
        self._catch_ups = 0
        oldest = self._waiting[0].sent_at or now
        age = now - oldest
        if age >= self._timeout:
            self._fail(StorageOutcomeUnknown(f"storage did not answer within {round(self._timeout * 1000)} ms"))
        else:
            self._arm_watchdog(self._timeout - age)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        parser = self._parser
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionResetError("storage closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future = self._waiting.popleft().future
                    if not future.done():
                        future.set_result(reply)
        except (OSError, IndexError, hiredis.ProtocolError) as e:
            self._fail(StorageOutcomeUnknown(_broke(e)), from_reader=True)

    def _fail(self, error: StorageUnavailable, *, from_reader: bool = False) -> None:
        """Fails every waiting call and drops the connection; the next call reconnects.

        ``error`` is for the calls already written; those still in the outbox never
        reached storage and are told so."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._writer is not None:
            self._writer.close()
        self._writer = self._reader = None
        if self._read_task is not None and not from_reader:
            self._read_task.cancel()
        self._read_task = None
        self._outbox.clear()
        self._catch_ups = 0
        unsent = StorageUnavailable("storage is unavailable: the connection was lost; nothing was applied")
        while self._waiting:
            pending = self._waiting.popleft()
            if not pending.future.done():
                pending.future.set_exception(error if pending.sent_at else unsent)


def _broke(error: Exception) -> str:
    """Why the connection broke, in words (no exception class names reach a caller)."""
    reason = error.strerror if isinstance(error, OSError) else None
    if isinstance(error, hiredis.ProtocolError):
        reason = "a reply that is not RESP"
    return f"the storage connection broke ({reason})" if reason else "the storage connection broke"
