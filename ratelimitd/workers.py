"""Several server processes on one port (``--workers N``).

A grpc.aio server runs on one core; all decision state is in storage, so more
processes behind one port (SO_REUSEPORT: the kernel spreads connections) add
throughput without changing any answer. The supervisor starts the embedded
Valkey if there is one, bootstraps the operator credential once, starts the
workers with the same settings (as environment variables), and stops them all
when it is stopped or when one dies. On Linux the workers die with it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time

from ratelimitd.api.metrics import MULTIPROCESS_ENV, Metrics
from ratelimitd.engine.credentials import Credentials
from ratelimitd.settings import Settings
from ratelimitd.storage import redis as storage
from ratelimitd.storage.embedded import EmbeddedValkey, die_with_parent
from ratelimitd.tls import server_credentials


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.embedded: EmbeddedValkey | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.bootstrap_token: str | None = None
        self.metrics: Metrics | None = None
        self.metrics_port = 0
        self._metrics_dir: tempfile.TemporaryDirectory[str] | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        s = self.settings
        host, _, port = s.listen.rpartition(":")
        if port == "0":
            raise ValueError("--workers needs a fixed port to share, not port 0")
        if s.tls_cert and s.tls_key:
            # each worker reads the files itself; a bad one should stop start-up here, named once
            server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca)
        url = s.redis_url
        if not url:
            self.embedded = EmbeddedValkey(s.data_dir)
            url = await self.embedded.start()
        client = storage.connect(url, timeout_s=s.storage_timeout_ms / 1000)
        try:
            self.bootstrap_token = await Credentials(client).bootstrap(s.operator_token)
        finally:
            await client.aclose()
        env = {**os.environ, **s.to_env(), "RATELIMITD_REDIS_URL": url, "RATELIMITD_WORKERS": "1"}
        if s.metrics_listen:
            # workers write their metrics to files here; the supervisor serves the sum
            self._metrics_dir = tempfile.TemporaryDirectory(prefix="ratelimitd-metrics-")
            env[MULTIPROCESS_ENV] = self._metrics_dir.name
            os.environ[MULTIPROCESS_ENV] = self._metrics_dir.name
            self.metrics = Metrics()
            self.metrics_port = self.metrics.serve(s.metrics_listen)
        for _ in range(s.workers):
            self.workers.append(
                subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness is awaited below
                    [sys.executable, "-m", "ratelimitd", "serve", "--worker"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=die_with_parent,
                )
            )
        deadline = time.monotonic() + timeout_s
        while not _accepts(host or "127.0.0.1", int(port)):
            if any(w.poll() is not None for w in self.workers) or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("a worker did not start; see its output above")
            await asyncio.sleep(0.05)

    async def wait(self, stop: asyncio.Event) -> None:
        """Until stopped, or until a worker exits (then everything stops: a supervisor
        that quietly runs on with fewer workers hides the failure)."""
        while not stop.is_set():
            if any(w.poll() is not None for w in self.workers):
                print("ratelimitd: a worker exited; stopping", file=sys.stderr)
                return
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass

    def stop(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.terminate()
        for w in self.workers:
            try:
                w.wait(10)
            except subprocess.TimeoutExpired:
                w.kill()
        if self.embedded is not None:
            self.embedded.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self._metrics_dir is not None:
            self._metrics_dir.cleanup()


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0
