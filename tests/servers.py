"""Real server processes for tests: Valkey on a free loopback port, ratelimitd subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from ratelimitd.storage.embedded import find_server_binary

ROOT = Path(__file__).resolve().parent.parent


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(
    ready: Callable[[], bool], what: str, timeout_s: float = 10, alive: Callable[[], bool] = lambda: True
) -> None:
    """Polls a process's readiness (a port, a ping, a page): the one place tests wait for a
    process to come up. Never for time to pass: windows are tested with the manual clock."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready")
        time.sleep(0.02)


def answers_ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ValkeyProcess:
    """A throwaway Valkey on 127.0.0.1; ``stop`` and ``start`` keep the same port."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str, wait_ready: bool = True) -> None:
        """``extra``: more server options. ``wait_ready=False``: return once the port
        accepts connections, even if the server only answers LOADING yet."""
        self.proc = subprocess.Popen(
            [
                find_server_binary(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--logfile", str(self.dir / "valkey.log"),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        proc = self.proc
        ready = (lambda: answers_ping(client)) if wait_ready else self.accepts_connections
        wait_until(ready, "valkey", alive=lambda: proc.poll() is None)

    def accepts_connections(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        stop_process(self.proc)


class RatelimitdProcess:
    """``ratelimitd serve`` as a separate process, as users run it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path, own_session: bool = False) -> None:
        """``own_session``: a process group of its own, for tests that signal a group, as a terminal does."""
        self.own_session = own_session
        self.port = free_port()
        self.log_path = log
        self.args = ["--listen", f"127.0.0.1:{self.port}", *args]
        # no drain unless a test asks for one: stopping a test server should not wait for load balancers
        self.env = {**os.environ, "RATELIMITD_DRAIN_S": "0", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ratelimitd", "serve", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
            start_new_session=self.own_session,
        )
        proc = self.proc

        def ready() -> bool:
            # the greeting (with a first start's credential) is printed after the port opens
            if "listening on" not in self.log_path.read_text():
                return False
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        try:
            wait_until(ready, "ratelimitd", timeout_s, alive=lambda: proc.poll() is None)
        except RuntimeError:
            raise RuntimeError(f"ratelimitd did not start:\n{self.log_path.read_text()}") from None

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        stop_process(self.proc)
        if hasattr(self, "_log"):
            self._log.close()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._log.close()
