"""What users of a gRPC service expect besides our own services: health and reflection."""

from __future__ import annotations

import asyncio
import urllib.request

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ratelimitd.app import SERVICE_NAMES, App
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import Client, Storage, channel_client, settings_for


async def test_reflection_lists_every_service(client: Client) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for reply in call:
        names |= {s.name for s in reply.list_services_response.service}
    assert set(SERVICE_NAMES) <= names
    assert "grpc.health.v1.Health" in names


async def test_health_reports_every_component(client: Client) -> None:
    stub = health_pb2_grpc.HealthStub(client.channel)
    for service in ["", "storage", *SERVICE_NAMES]:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def scrape(port: int) -> dict[str, float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    samples = {}
    for line in (await asyncio.to_thread(get)).splitlines():
        if line.startswith("ratelimitd_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_metrics_count_decisions_by_outcome(storage: Storage, redis_client: object, clock: object) -> None:
    app = App(settings_for(storage.url, metrics_listen="127.0.0.1:0"))
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    try:
        org = await client.org("o", [("m", "requests", "minute", 2)])
        _, key = await client.project(org, "a")
        for _ in range(3):
            await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model="m"))
        await client.decisions.CheckAndConsume(pb.CheckRequest(api_key="nope", model="m"))
        m = await scrape(app.metrics_port)
        assert m['ratelimitd_decisions_total{outcome="allowed"}'] == 2
        assert m['ratelimitd_decisions_total{outcome="organization_limit"}'] == 1
        assert m['ratelimitd_decisions_total{outcome="invalid_api_key"}'] == 1
        assert m["ratelimitd_storage_up"] == 1
        # three decisions reached storage (the malformed key did not)
        assert m['ratelimitd_decision_seconds_count{api="check_and_consume"}'] == 3
    finally:
        await client.channel.close()
        await app.stop(0)
