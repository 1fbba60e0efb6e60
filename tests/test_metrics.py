"""Metrics: build_info, no _created series, opt-in per-model and per-organization counts with a bound."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator

import pytest
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from ratelimitd import __version__
from ratelimitd.app import App
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import Client, Storage, channel_client, settings_for
from tests.servers import ROOT


async def exposition(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    return await asyncio.to_thread(get)


def samples(text: str) -> dict[str, float]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("ratelimitd_"):
            name, value = line.rsplit(" ", 1)
            rows[name] = float(value)
    return rows


async def started(storage: Storage, **overrides: object) -> tuple[App, Client]:
    app = App(settings_for(storage.url, metrics_listen="127.0.0.1:0", **overrides))
    await app.start()
    return app, channel_client(f"127.0.0.1:{app.port}")


@pytest.fixture
async def plain(storage: Storage, redis_client: object, clock: object) -> AsyncIterator[tuple[App, Client]]:
    app, client = await started(storage)
    yield app, client
    await client.channel.close()
    await app.stop(0)


async def test_build_info_and_no_created_series(plain: tuple[App, Client]) -> None:
    app, client = plain
    org = await client.org("o", [("m", "requests", "minute", 5)])
    _, key = await client.project(org, "a")
    await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model="m"))
    text = await exposition(app.metrics_port)
    info = [line for line in text.splitlines() if line.startswith("ratelimitd_build_info{")]
    assert len(info) == 1 and info[0].endswith(" 1.0"), info
    assert f'version="{__version__}"' in info[0] and 'python="' in info[0] and 'grpc="' in info[0]
    assert "_created" not in text
    assert samples(text)['ratelimitd_decisions_total{outcome="allowed"}'] == 1
    # off by default: no per-model or per-organization series at all
    assert "ratelimitd_model_decisions" not in text and "ratelimitd_organization_decisions" not in text


async def test_per_model_and_per_organization_counts_fold_past_their_bound_into_other(
    storage: Storage, redis_client: object, clock: object
) -> None:
    app, client = await started(storage, metrics_model_labels=2, metrics_organization_labels=1)
    try:
        first = await client.org("first", [("*", "requests", "minute", 2)])
        second = await client.org("second", [("*", "requests", "minute", 100)])
        _, key1 = await client.project(first, "a")
        _, key2 = await client.project(second, "b")
        for model in ("m1", "m1", "m1", "m2", "m3", "m4"):
            await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key1, model=model))
        await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key2, model="m1"))
        await client.decisions.CheckAndConsume(pb.CheckRequest(api_key="rlk_malformed", model="m2"))
        text = await exposition(app.metrics_port)
        m = samples(text)
    finally:
        await client.channel.close()
        await app.stop(0)
    by_model = {k: v for k, v in m.items() if k.startswith("ratelimitd_model_decisions_total")}
    assert by_model == {
        'ratelimitd_model_decisions_total{model="m1",outcome="allowed"}': 3,
        'ratelimitd_model_decisions_total{model="m1",outcome="organization_limit"}': 1,
        'ratelimitd_model_decisions_total{model="m2",outcome="allowed"}': 1,
        'ratelimitd_model_decisions_total{model="m2",outcome="invalid_api_key"}': 1,
        'ratelimitd_model_decisions_total{model="other",outcome="allowed"}': 2,  # m3 and m4: past the bound of 2
    }
    by_org = {k: v for k, v in m.items() if k.startswith("ratelimitd_organization_decisions_total")}
    assert by_org == {
        f'ratelimitd_organization_decisions_total{{organization="{first}",outcome="allowed"}}': 5,
        f'ratelimitd_organization_decisions_total{{organization="{first}",outcome="organization_limit"}}': 1,
        'ratelimitd_organization_decisions_total{organization="other",outcome="allowed"}': 1,
        'ratelimitd_organization_decisions_total{organization="other",outcome="invalid_api_key"}': 1,
    }

    # every metric exposed, the opt-in ones included, is in docs/operations.md's table, and no other
    exposed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ratelimitd_")}
    assert exposed == documented_metrics()


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text[text.index("\n## Metrics\n") : text.index("### Example alerts")]
    names = set()
    for line in table.splitlines():
        if line.startswith("| `ratelimitd_"):
            name = line.split("`")[1].split("{")[0]
            names.add(name)
    return names


def test_the_example_alerts_parse_and_name_only_real_metrics() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    alerts = text[text.index("### Example alerts") :].split("```yaml\n", 1)[1].split("```", 1)[0]
    rules = yaml.safe_load(alerts)["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {
        "RatelimitdStorageDown",
        "RatelimitdRefusalRateHigh",
        "RatelimitdDecisionLatencyHigh",
    }
    known = documented_metrics()
    for rule in rules:
        for name in re.findall(r"ratelimitd_[a-z_]+", rule["expr"]):
            assert re.sub(r"(_bucket|_sum|_count)$", "", name) in known, (rule["alert"], name)
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}


async def test_envoy_decisions_are_counted_by_their_first_descriptors_model(
    storage: Storage, redis_client: object, clock: object
) -> None:
    def descriptor(**entries: str) -> common_pb.RateLimitDescriptor:
        return common_pb.RateLimitDescriptor(
            entries=[common_pb.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()]
        )

    app, client = await started(storage, metrics_model_labels=1, metrics_organization_labels=5)
    try:
        org = await client.org("o", [("*", "requests", "minute", 10)])
        _, key = await client.project(org, "a")
        stub = rls_pb2_grpc.RateLimitServiceStub(client.channel)
        for model in ("first", "second"):
            request = rls_pb2.RateLimitRequest(
                domain="ratelimitd",
                descriptors=[descriptor(api_key=key, model=model), descriptor(api_key=key, model="third")],
            )
            assert (await stub.ShouldRateLimit(request)).overall_code == rls_pb2.RateLimitResponse.OK
        m = samples(await exposition(app.metrics_port))
    finally:
        await client.channel.close()
        await app.stop(0)
    assert {k: v for k, v in m.items() if k.startswith("ratelimitd_model_decisions_total")} == {
        'ratelimitd_model_decisions_total{model="first",outcome="allowed"}': 1,
        'ratelimitd_model_decisions_total{model="other",outcome="allowed"}': 1,
    }
    assert m[f'ratelimitd_organization_decisions_total{{organization="{org}",outcome="allowed"}}'] == 2
