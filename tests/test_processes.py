"""Whole processes: several servers on one Valkey, storage outages, the embedded default."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ratelimitd.app import App
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import OPERATOR_TOKEN, Client, Storage, channel_client, settings_for
from tests.servers import RatelimitdProcess, ValkeyProcess, free_port
from tests.test_server import scrape

M = "llama-3.1-8b-instant"
ENV = {"RATELIMITD_OPERATOR_TOKEN": OPERATOR_TOKEN}


async def test_200_concurrent_calls_over_two_processes_admit_exactly_100(
    storage: Storage, redis_client: redis.asyncio.Redis, tmp_path: Path
) -> None:
    servers = [
        RatelimitdProcess("--redis-url", storage.url, "--manual-clock", env=ENV, log=tmp_path / f"s{i}.log")
        for i in range(2)
    ]
    await redis_client.set("rl:clock", 1_000_000_000_000)
    for s in servers:
        s.start()
    clients = [channel_client(s.address) for s in servers]
    try:
        org = await clients[0].org("o", [(M, "requests", "minute", 100)])
        _, key = await clients[1].project(org, "a")
        req = pb.CheckRequest(api_key=key, model=M)
        replies = await asyncio.gather(*(clients[i % 2].decisions.CheckAndConsume(req) for i in range(200)))
        assert sum(r.allowed for r in replies) == 100
        assert {r.reason for r in replies if not r.allowed} == {pb.REASON_ORGANIZATION_LIMIT}
    finally:
        for c in clients:
            await c.channel.close()
        for s in servers:
            s.stop()


async def test_workers_share_one_port_and_one_answer(
    storage: Storage, redis_client: redis.asyncio.Redis, tmp_path: Path
) -> None:
    metrics_port = free_port()
    server = RatelimitdProcess(
        "--redis-url", storage.url, "--manual-clock", "--workers", "2", "--metrics-listen", f"127.0.0.1:{metrics_port}",
        env=ENV, log=tmp_path / "s.log",
    )  # fmt: skip
    await redis_client.set("rl:clock", 1_000_000_000_000)
    server.start()
    assert server.proc is not None
    proc_children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    children = proc_children.read_text().split()  # noqa: ASYNC240 - a tiny /proc read
    assert len(children) == 2
    clients = [channel_client(server.address) for _ in range(8)]  # connections the kernel spreads
    try:
        org = await clients[0].org("o", [(M, "requests", "minute", 100)])
        _, key = await clients[1].project(org, "a")
        req = pb.CheckRequest(api_key=key, model=M)
        replies = await asyncio.gather(*(clients[i % 8].decisions.CheckAndConsume(req) for i in range(200)))
        assert sum(r.allowed for r in replies) == 100
        m = await scrape(metrics_port)  # the sum over both workers
        assert m['ratelimitd_decisions_total{outcome="allowed"}'] == 100
        assert m['ratelimitd_decisions_total{outcome="organization_limit"}'] == 100
        assert [v for k, v in m.items() if k.startswith("ratelimitd_build_info{")] == [
            1
        ]  # one series, not one a worker
    finally:
        for c in clients:
            await c.channel.close()
        server.stop()
    assert "2 worker processes" in server.output()


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def test_storage_outage_fails_fast_reports_not_serving_and_recovers(own_valkey: ValkeyProcess) -> None:
    app = App(settings_for(own_valkey.url, health_interval_s=0.05, metrics_listen="127.0.0.1:0"))
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    try:
        org = await client.org("o", [(M, "requests", "minute", 100)])
        _, key = await client.project(org, "a")
        req = pb.CheckRequest(api_key=key, model=M)
        assert (await client.decisions.CheckAndConsume(req)).allowed
        assert await health_status(client.channel, "storage") == health_pb2.HealthCheckResponse.SERVING

        own_valkey.stop()
        errors_before = (await scrape(app.metrics_port)).get("ratelimitd_storage_errors_total", 0)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.decisions.CheckAndConsume(req, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "storage" in (e.value.details() or "")
        assert await health_status(client.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await health_status(client.channel, "storage") == health_pb2.HealthCheckResponse.NOT_SERVING
        m = await scrape(app.metrics_port)
        assert m["ratelimitd_storage_errors_total"] >= errors_before + 3 and m["ratelimitd_storage_up"] == 0

        own_valkey.start()  # same port, empty data: the org is gone, but the service is back
        deadline = time.monotonic() + 10
        while await health_status(client.channel) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never came back"
            await asyncio.sleep(0.02)
        reply = await client.decisions.CheckAndConsume(req)
        assert reply.reason == pb.REASON_INVALID_API_KEY  # answered from storage again
    finally:
        await client.channel.close()
        await app.stop(0)


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_storage_outage_policy_fail_open_or_closed(own_valkey: ValkeyProcess, policy: str) -> None:
    app = App(settings_for(own_valkey.url, on_storage_error=policy))
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    try:
        org = await client.org("o", [(M, "requests", "minute", 100)])
        _, key = await client.project(org, "a")
        own_valkey.stop()
        reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M), timeout=5)
        assert reply.reason == pb.REASON_STORAGE_UNAVAILABLE
        assert reply.allowed is (policy == "allow")
    finally:
        await client.channel.close()
        await app.stop(0)


async def _use(client: Client, key: str, n: int) -> list[bool]:
    return [(await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))).allowed for _ in range(n)]


@pytest.mark.parametrize("how", ["terminate", "kill -9"])
async def test_embedded_default_keeps_its_data_across_restarts(tmp_path: Path, how: str) -> None:
    data = tmp_path / "data"
    first = RatelimitdProcess("--data-dir", str(data), log=tmp_path / "first.log")
    first.start()
    output = first.output()
    token = next(line.split("=", 1)[1] for line in output.splitlines() if "RATELIMITD_TOKEN=" in line)
    assert "ratelimitd demo --address" in output and str(data) in output
    auth = (("authorization", f"Bearer {token}"),)
    client = channel_client(first.address)
    try:
        from ratelimitd.v1 import admin_pb2 as apb

        org = await client.orgs.CreateOrganization(apb.CreateOrganizationRequest(name="o"), metadata=auth)
        await client.orgs.SetOrganizationLimits(
            apb.SetOrganizationLimitsRequest(
                organization_id=org.id, set=[apb.Limit(model=M, metric="requests", window="day", limit=5)]
            ),
            metadata=auth,
        )
        p = await client.projects.CreateProject(
            apb.CreateProjectRequest(organization_id=org.id, name="p"), metadata=auth
        )
        key = await client.projects.CreateApiKey(
            apb.CreateApiKeyRequest(organization_id=org.id, project_id=p.id, name="k"), metadata=auth
        )
        assert await _use(client, key.secret, 3) == [True] * 3
    finally:
        await client.channel.close()
    if how == "terminate":
        first.stop()
    else:
        first.kill9()

    second = RatelimitdProcess("--data-dir", str(data), log=tmp_path / "second.log")
    second.start()
    client = channel_client(second.address)
    try:
        assert "RATELIMITD_TOKEN=" not in second.output()  # the credential survived too
        # bucket state survived: 2 of the day's 5 are left
        assert await _use(client, key.secret, 3) == [True, True, False]
        keys = await client.projects.ListApiKeys(
            apb.ListApiKeysRequest(organization_id=org.id, project_id=p.id), metadata=auth
        )
        assert [k.name for k in keys.keys] == ["k"]
    finally:
        await client.channel.close()
        second.stop()
