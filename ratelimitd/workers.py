"""Several server processes on one port (``--workers N``).

A grpc.aio server runs on one core; all decision state is in storage, so more
processes behind one port (SO_REUSEPORT: the kernel spreads connections) add
throughput without changing any answer. The supervisor checks that the port is
free, starts the embedded Valkey if there is one, bootstraps the operator
credential once, and starts the workers with the same settings (as environment
variables). A worker that dies is restarted after a back-off while the others
keep answering; only repeated crashes (``worker_crash_limit`` within
``worker_crash_window_s``) stop the whole server, since a crash loop is a fault
that restarting does not fix. On SIGTERM every worker drains. On Linux the
workers die with the supervisor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from ratelimitd.api.metrics import MULTIPROCESS_ENV, Metrics
from ratelimitd.core.errors import StorageUnavailable
from ratelimitd.engine.credentials import Credentials
from ratelimitd.settings import Settings
from ratelimitd.storage import redis as storage
from ratelimitd.storage.embedded import EmbeddedValkey, die_with_parent
from ratelimitd.tls import server_credentials

log = logging.getLogger(__name__)

_MAX_RESTART_DELAY_S = 30.0
# Beyond drain and grace, how long a worker may take to exit before it is killed.
_EXIT_MARGIN_S = 5.0


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.embedded: EmbeddedValkey | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.bootstrap_token: str | None = None
        self.metrics: Metrics | None = None
        self.metrics_port = 0
        self._metrics_dir: tempfile.TemporaryDirectory[str] | None = None
        self._env: dict[str, str] = {}
        self._crashes: collections.deque[float] = collections.deque()  # when, monotonic, within the window
        self._restart_at: dict[int, float] = {}  # worker slot -> when to start it again
        # Storage that did not answer at start: the workers start anyway (NOT_SERVING until it
        # does, as a single process would), and the operator credential is made once it answers.
        self.storage_up = True
        self.on_late_bootstrap: Callable[[str], None] = lambda token: None
        self._storage_url = ""

    async def start(self, timeout_s: float = 30.0) -> None:
        s = self.settings
        host, _, port = s.listen.rpartition(":")
        if port == "0":
            raise ValueError("--workers needs a fixed port to share, not port 0")
        if s.tls_cert and s.tls_key:
            # each worker reads the files itself; a bad one should stop start-up here, named once
            server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca)
        _check_port_free(host, int(port), s.listen)
        if s.http_listen:  # each worker serves HTTP too, on one shared port
            http_host, _, http_port = s.http_listen.rpartition(":")
            if http_port == "0":
                raise ValueError("--workers needs a fixed HTTP port to share, not port 0")
            _check_port_free(http_host, int(http_port), s.http_listen)
        url = s.redis_url
        if not url:
            self.embedded = EmbeddedValkey(s.data_dir)
            url = await self.embedded.start()
        self._storage_url = url
        self.storage_up = await self._bootstrap()
        self._env = {**os.environ, **s.to_env(), "RATELIMITD_REDIS_URL": url, "RATELIMITD_WORKERS": "1"}
        if s.metrics_listen:
            # workers write their metrics to files here; the supervisor serves the sum
            self._metrics_dir = tempfile.TemporaryDirectory(prefix="ratelimitd-metrics-")
            self._env[MULTIPROCESS_ENV] = self._metrics_dir.name
            os.environ[MULTIPROCESS_ENV] = self._metrics_dir.name
            self.metrics = Metrics()
            self.metrics_port = self.metrics.serve(s.metrics_listen)
        self.workers = [self._spawn() for _ in range(s.workers)]
        deadline = time.monotonic() + timeout_s
        while not _accepts(host or "127.0.0.1", int(port)):
            if failure := self.tend():
                raise RuntimeError(failure)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker opened the port within {timeout_s:g} s; see their output above")
            await asyncio.sleep(0.05)

    async def _bootstrap(self) -> bool:
        """Creates the first operator credential (if none exists); False when storage did not answer."""
        client = storage.connect(
            self._storage_url, timeout_s=self.settings.storage_timeout_ms / 1000, tls=self.settings.storage_tls
        )
        try:
            self.bootstrap_token = await Credentials(client).bootstrap(self.settings.operator_token)
        except StorageUnavailable:
            return False
        finally:
            await client.aclose()
        return True

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "ratelimitd", "serve", "--worker"],
            env=self._env,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    def tend(self) -> str | None:
        """Schedules a restart for each worker that died and starts those that are due.
        Returns why to give up when crashes come too often, else None."""
        s = self.settings
        now = time.monotonic()
        for slot, worker in enumerate(self.workers):
            if worker.poll() is None:
                continue
            if slot not in self._restart_at:
                self._crashes.append(now)
                while now - self._crashes[0] > s.worker_crash_window_s:
                    self._crashes.popleft()
                how = _exit_reason(worker.returncode)
                if len(self._crashes) >= s.worker_crash_limit:
                    return (
                        f"workers crashed {len(self._crashes)} times within {s.worker_crash_window_s:g} s "
                        f"(the last: worker {slot + 1}, pid {worker.pid}, {how})"
                    )
                delay = min(s.worker_restart_backoff_s * 2 ** (len(self._crashes) - 1), _MAX_RESTART_DELAY_S)
                log.warning("worker %d (pid %d) %s; restarting it in %.1f s", slot + 1, worker.pid, how, delay)
                self._restart_at[slot] = now + delay
            elif now >= self._restart_at[slot]:
                del self._restart_at[slot]
                self.workers[slot] = self._spawn()
                log.warning("worker %d restarted (pid %d)", slot + 1, self.workers[slot].pid)
        return None

    async def wait(self, stop: asyncio.Event) -> str | None:
        """Tends the workers until stopped (None), or until crashes come too often (why)."""
        next_bootstrap = time.monotonic()
        while not stop.is_set():
            if failure := self.tend():
                return failure
            if not self.storage_up and time.monotonic() >= next_bootstrap:
                next_bootstrap = time.monotonic() + self.settings.health_interval_s
                if await self._bootstrap():
                    self.storage_up = True
                    if self.bootstrap_token:
                        self.on_late_bootstrap(self.bootstrap_token)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        return None

    async def stop(self, hurry: asyncio.Event | None = None) -> None:
        """SIGTERM to every worker, which drains; a signal on ``hurry`` is passed on
        (it ends their drain early). Workers still running after drain, grace and a
        margin are killed; then storage stops."""
        s = self.settings
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + s.drain_s + s.shutdown_grace_s + _EXIT_MARGIN_S
        while any(w.poll() is None for w in self.workers) and time.monotonic() < deadline:
            if hurry is not None and hurry.is_set():
                hurry.clear()
                self._signal_workers(signal.SIGTERM)
            await asyncio.sleep(0.05)
        for w in self.workers:
            if w.poll() is None:
                log.error("worker pid %d did not stop in time; killing it", w.pid)
                w.kill()
                w.wait()
        if self.embedded is not None:
            self.embedded.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self._metrics_dir is not None:
            self._metrics_dir.cleanup()

    def _signal_workers(self, signum: signal.Signals) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signum)


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _check_port_free(host: str, port: int, listen: str) -> None:
    """The workers bind with SO_REUSEPORT, which would quietly share a port another
    server holds; checking first also keeps a doomed start away from storage."""
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as e:
        raise OSError(f"cannot listen on {listen}: {e.strerror}") from None


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0
