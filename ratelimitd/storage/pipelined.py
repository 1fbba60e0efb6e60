"""An auto-pipelining connection for the hot path's script calls.

Every command issued in one turn of the event loop goes out in one write on one
connection, and the replies come back in order through one hiredis parser. Under
load, concurrent decisions share round trips and system calls instead of each
taking a pooled connection, packing, writing and reading on its own; with no
concurrency it costs what a plain call costs.

Failure is fast and shared: when the oldest unanswered command is older than
the timeout, or the connection breaks, every waiting call fails with
StorageUnavailable and the next call reconnects. NOSCRIPT (a new or restarted
server) is answered by loading the script and retrying once.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url

from ratelimitd.engine.errors import StorageUnavailable
from ratelimitd.engine.scripts import LuaScript


class ScriptError(Exception):
    """A script failed inside the server: a bug, not an outage."""


def _encode(args: Sequence[str | int | bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


class PipelinedConnection:
    def __init__(self, url: str, *, timeout_s: float) -> None:
        self._options: dict[str, Any] = dict(parse_url(url))
        self._tls = url.startswith("rediss://")
        self._timeout = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._outbox: list[bytes] = []
        # (future, sent at) per command in flight, in the order the server answers
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
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
        self._outbox.append(_encode(command))
        self._waiting.append((future, time.monotonic()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        reply = await future
        if isinstance(reply, hiredis.ReplyError):
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
        except (OSError, TimeoutError, ScriptError) as e:
            error = StorageUnavailable(f"storage is unavailable: {type(e).__name__}")
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
            context = ssl.create_default_context() if self._tls else None
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
        self._outbox.clear()
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self._timeout, self._check_deadline)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        age = time.monotonic() - self._waiting[0][1]
        if age >= self._timeout:
            self._fail(StorageUnavailable("storage is unavailable: TimeoutError"))
        else:
            self._watchdog = asyncio.get_running_loop().call_later(self._timeout - age, self._check_deadline)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        parser = self._parser
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionResetError("storage closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future, _ = self._waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
        except (OSError, IndexError, hiredis.ProtocolError) as e:
            self._fail(StorageUnavailable(f"storage is unavailable: {type(e).__name__}"), from_reader=True)

    def _fail(self, error: StorageUnavailable, *, from_reader: bool = False) -> None:
        """Fails every waiting call and drops the connection; the next call reconnects."""
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
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)
