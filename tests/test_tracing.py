"""Traces (issue 14, item 3): off by default and then free; on, a span per RPC and per storage
script call, with the decision's outcome, exported over OTLP to a real collector in the test."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.settings import Settings
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import Client, Clock, Storage, channel_client, settings_for
from tests.otel_collector import Collector, ReceivedSpan
from tests.servers import ROOT

M = "llama-3.1-8b-instant"
CHECK = "ratelimitd.v1.RateLimitService/CheckAndConsume"
SERVER, CLIENT = 2, 3  # OTLP span kinds


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.stop()


async def start_traced(storage: Storage, collector: Collector, **overrides: object) -> App:
    app = App(settings_for(storage.url, trace_otlp_endpoint=collector.endpoint, **overrides))
    await app.start()
    return app


@pytest.fixture
async def traced(
    storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock, collector: Collector
) -> AsyncIterator[tuple[App, Client]]:
    app = await start_traced(storage, collector)
    c = channel_client(f"127.0.0.1:{app.port}")
    yield app, c
    await c.channel.close()
    await app.stop(0)


async def exported(app: App, collector: Collector, name: str, count: int) -> None:
    """Flushes until ``count`` spans of that name arrived: a call that fails has told its caller
    before its span ends, so one flush may come before the span is queued."""
    assert app.tracing is not None
    deadline = time.monotonic() + 30  # a hang guard
    while len(collector.named(name)) < count and time.monotonic() < deadline:
        await app.tracing.flush()
    await app.tracing.flush()


def only(spans: list[ReceivedSpan]) -> ReceivedSpan:
    assert len(spans) == 1, spans
    return spans[0]


async def test_each_decision_has_a_server_span_and_a_storage_span_with_its_outcome(
    traced: tuple[App, Client], collector: Collector
) -> None:
    app, client = traced
    org = await client.org("acme", [(M, "requests", "minute", 1)])
    pid, secret = await client.project(org, "prod")
    first = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M, request_id="r-1"))
    second = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M))
    assert (first.allowed, second.allowed) == (True, False)
    await client.decisions.ReportUsage(pb.ReportUsageRequest(api_key=secret, request_id="r-1", input_tokens=5))
    await exported(app, collector, "ratelimitd.v1.RateLimitService/ReportUsage", 1)

    checks = collector.named(CHECK)
    assert [s.attributes["ratelimitd.outcome"] for s in checks] == ["allowed", "organization_limit"]
    for span, allowed in zip(checks, (True, False), strict=True):
        assert span.kind == SERVER and span.service_name == "ratelimitd"
        assert span.attributes["rpc.system"] == "grpc" and span.attributes["rpc.method"] == "CheckAndConsume"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.attributes["ratelimitd.allowed"] is allowed
        assert (span.attributes["ratelimitd.organization_id"], span.attributes["ratelimitd.project_id"]) == (org, pid)
        storage = only(collector.children(span))
        assert (storage.name, storage.kind) == ("FCALL decide", CLIENT)
        assert storage.attributes["ratelimitd.organization_id"] == org
        assert storage.attributes["ratelimitd.outcome"] == span.attributes["ratelimitd.outcome"]

    report = only(collector.named("ratelimitd.v1.RateLimitService/ReportUsage"))
    assert report.attributes["ratelimitd.outcome"] == "reconciled"
    assert only(collector.children(report)).attributes["ratelimitd.outcome"] == "reconciled"

    # Neither the key nor its stored hash reaches any span.
    key_hash = hashlib.sha256(secret.encode()).hexdigest()
    for span in collector.spans:
        for value in span.attributes.values():
            assert secret not in str(value) and key_hash not in str(value), span


async def test_a_failed_call_records_its_status_and_a_traceparent_joins_the_callers_trace(
    traced: tuple[App, Client], collector: Collector
) -> None:
    app, client = traced
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.decisions.CheckAndConsume(
            pb.CheckRequest(api_key="rl_whatever", model="no such model!"),
            metadata=(("traceparent", f"00-{trace_id}-{parent}-01"),),
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await exported(app, collector, CHECK, 1)
    span = only(collector.named(CHECK))
    assert (span.trace_id, span.parent_span_id) == (trace_id, parent)
    assert (
        span.status_code == 2 and span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )
    assert "ratelimitd.outcome" not in span.attributes


async def test_a_stream_is_one_span_with_a_storage_span_per_decision(
    traced: tuple[App, Client], collector: Collector
) -> None:
    app, client = traced
    org = await client.org("acme", [(M, "requests", "minute", 2)])
    _, secret = await client.project(org, "prod")
    call = client.decisions.CheckAndConsumeStream(iter([pb.CheckRequest(api_key=secret, model=M)] * 3))
    answers = [a.allowed async for a in call]
    assert sorted(answers) == [False, True, True]
    await exported(app, collector, "ratelimitd.v1.RateLimitService/CheckAndConsumeStream", 1)
    span = only(collector.named("ratelimitd.v1.RateLimitService/CheckAndConsumeStream"))
    assert (span.attributes["ratelimitd.answers"], span.attributes["ratelimitd.refused"]) == (3, 1)
    outcomes = sorted(s.attributes["ratelimitd.outcome"] for s in collector.children(span))
    assert outcomes == ["allowed", "allowed", "organization_limit"]


async def test_sampling_records_the_configured_share_and_follows_a_sampled_caller(
    storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock, collector: Collector
) -> None:
    app = await start_traced(storage, collector, trace_sample_ratio=1e-12)
    client = channel_client(f"127.0.0.1:{app.port}")
    try:
        org = await client.org("acme", [(M, "requests", "minute", 10)])
        _, secret = await client.project(org, "prod")
        await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M))
        sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        await client.decisions.CheckAndConsume(
            pb.CheckRequest(api_key=secret, model=M), metadata=(("traceparent", sampled),)
        )
        await exported(app, collector, CHECK, 1)
    finally:
        await client.channel.close()
        await app.stop(0)
    # Only the call whose caller had sampled its trace: the ratio left out every other one.
    assert {s.trace_id for s in collector.spans} == {"0af7651916cd43dd8448eb211c80319c"}
    assert len(collector.named(CHECK)) == 1 and len(collector.named("FCALL decide")) == 1


def test_tracing_is_off_by_default_and_then_no_tracer_is_even_loaded(storage: Storage) -> None:
    """Off costs nothing: a server that starts and decides never loads the tracing interceptor nor
    OpenTelemetry's SDK tracer, so no span can be made. (redis-py imports parts of OpenTelemetry's
    API for its own observability, which is off unless configured: those are not ours to judge.)"""
    script = f"""
import asyncio, sys
from ratelimitd.app import App
from ratelimitd.engine.decisions import Caller
from ratelimitd.settings import Settings

async def main():
    app = App(Settings.load(env={{}}, listen="127.0.0.1:0", redis_url={storage.url!r}))
    await app.start()
    try:
        decision = await app.decider.check(Caller("org_x", "key_x", "0" * 64, ""), "m", 1, 0)
        loaded = sorted(m for m in ("ratelimitd.api.tracing", "opentelemetry.sdk.trace") if m in sys.modules)
        print(decision.outcome.name, app.tracing, loaded)
    finally:
        await app.stop(0)

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "INVALID_API_KEY None []"


async def test_tracing_configured_without_the_otel_extra_refuses_to_start_and_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    app = App(Settings.load(env={}, listen="127.0.0.1:0", trace_otlp_endpoint="http://127.0.0.1:4317"))
    with pytest.raises(RuntimeError, match=r"trace_otlp_endpoint is set.*pip install 'ratelimitd\[otel\]'"):
        await app.start()
    assert app.server is None and app.embedded is None  # refused before anything started


async def test_an_overwritten_opentelemetry_proto_is_named_with_the_command_that_fixes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as when xds-protos installed its older copy of these modules last: the exporter cannot import them
    for name in [m for m in sys.modules if m.startswith("opentelemetry.exporter")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry.proto.common.v1.common_pb2", None)
    app = App(Settings.load(env={}, listen="127.0.0.1:0", trace_otlp_endpoint="http://127.0.0.1:4317"))
    with pytest.raises(RuntimeError) as refused:
        await app.start()
    assert "xds-protos installed its older copy over it" in str(refused.value)
    assert "pip install --force-reinstall --no-deps opentelemetry-proto==" in str(refused.value)
    assert app.server is None and app.embedded is None


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        (
            "trace_otlp_endpoint",
            "127.0.0.1:4317",
            "trace_otlp_endpoint '127.0.0.1:4317' is not an http:// or https:// URL",
        ),
        ("trace_sample_ratio", "0", "trace_sample_ratio must be more than 0 and at most 1, not 0.0"),
        ("trace_sample_ratio", "1.5", "trace_sample_ratio must be more than 0 and at most 1, not 1.5"),
    ],
)
def test_bad_tracing_settings_are_refused_by_name(setting: str, value: str, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        Settings.load(env={f"RATELIMITD_{setting.upper()}": value})
    assert str(refused.value) == message
