"""`ratelimitd serve` on storage that does not answer yet: it says so, and recovers by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ratelimitd.v1 import admin_pb2 as apb
from tests.conftest import channel_client
from tests.servers import RatelimitdProcess, ValkeyProcess

SERVING = health_pb2.HealthCheckResponse.SERVING


async def health(channel: grpc.aio.Channel) -> int:
    return int((await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status)


async def poll(what: str, ready: Callable[[], Awaitable[bool]]) -> None:
    """A readiness poll with a generous hang guard; never a wait for time to pass."""
    deadline = time.monotonic() + 20
    while not await ready():
        assert time.monotonic() < deadline, f"{what} never happened"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_unreachable_storage_at_start_is_a_clear_warning_and_the_credential_comes_when_it_answers(
    tmp_path: Path, workers: str
) -> None:
    (tmp_path / "valkey").mkdir()
    valkey = ValkeyProcess(tmp_path / "valkey")  # its port is chosen, nothing listens on it yet
    server = RatelimitdProcess(
        "--redis-url",
        valkey.url,
        "--workers",
        workers,
        env={"RATELIMITD_HEALTH_INTERVAL_S": "0.05"},
        log=tmp_path / "serve.log",
    )
    server.start()
    client = channel_client(server.address)
    try:
        said = server.output()
        assert "WARNING: storage is unreachable" in said and "recovers by itself" in said
        assert "created on first start" not in said and "RATELIMITD_TOKEN=" not in said
        assert "operator credential: none yet" in said
        assert await health(client.channel) != SERVING

        valkey.start()

        async def serving() -> bool:
            return bool(await health(client.channel) == SERVING)

        async def credential_shown() -> bool:
            return "export RATELIMITD_TOKEN=" in server.output()

        await poll("health SERVING", serving)
        await poll("the credential", credential_shown)
        token = next(line.split("=", 1)[1] for line in server.output().splitlines() if "RATELIMITD_TOKEN=" in line)
        me = await client.creds.WhoAmI(apb.WhoAmIRequest(), metadata=(("authorization", f"Bearer {token}"),))
        assert me.kind == "operator"
    finally:
        await client.channel.close()
        server.stop()
        valkey.stop()
