"""A real Envoy (clients/envoy/envoy.yaml) in front of a real HTTP upstream, deciding with ratelimitd on Valkey."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.core import keys
from tests.conftest import Client, Clock, settings_for
from tests.edge import (
    SHIPPED_CONFIG,
    EnvoyProcess,
    Reply,
    envoy_binary,
    envoy_config,
    http_request,
    requires_envoy,
    upstream,
)
from tests.servers import ValkeyProcess, free_port

pytestmark = requires_envoy  # every test here runs a real Envoy

M = "llama-3.1-8b-instant"
M2 = "llama-3.3-70b-versatile"
CHAT = "/v1/chat/completions"
RATE_HEADERS = {f"x-ratelimit-{h}-{m}" for h in ("limit", "remaining", "reset") for m in ("requests", "tokens")}


@dataclass
class Edge:
    envoy: EnvoyProcess

    async def chat(
        self, key: str | None, model: str = M, *, max_tokens: int | None = None, usage: int | None = None
    ) -> Reply:
        """POST /v1/chat/completions as an OpenAI client does; ``usage``: the tokens the upstream reports."""
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        headers = {"authorization": f"Bearer {key}"} if key else {}
        if usage is not None:
            headers["x-test-usage-tokens"] = str(usage)
        return await asyncio.to_thread(http_request, self.envoy.port, "POST", CHAT, body, headers)

    async def get(self, path: str) -> Reply:
        return await asyncio.to_thread(http_request, self.envoy.port, "GET", path)


@pytest.fixture
def upstream_port() -> Iterator[int]:
    with upstream() as port:
        yield port


def start_envoy(tmp: Path, upstream_port: int, ratelimitd_port: int, failure_mode_deny: bool = False) -> EnvoyProcess:
    envoy = EnvoyProcess(
        envoy_config(
            listen_port=free_port(),
            admin_port=free_port(),
            upstream_port=upstream_port,
            ratelimitd_port=ratelimitd_port,
            failure_mode_deny=failure_mode_deny,
        ),
        tmp,
    )
    envoy.start()
    return envoy


@pytest.fixture
async def edge(app: App, upstream_port: int, tmp_path: Path) -> AsyncIterator[Edge]:
    envoy = start_envoy(tmp_path, upstream_port, app.port)
    yield Edge(envoy)
    envoy.stop()


def test_the_shipped_config_validates_as_is() -> None:
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(SHIPPED_CONFIG), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_429_after_the_project_limit_with_headers_on_200_and_429_and_a_json_body(
    client: Client, edge: Edge
) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100), (M, "requests", "day", 1000)])
    pid, key = await client.project(org, "prod", [(M, "requests", "minute", 3)])
    for i in range(3):
        ok = await edge.chat(key)
        assert ok.status == 200, ok
        # No token limit here, so no token headers.
        assert {h for h in ok.headers if h.startswith("x-ratelimit-")} == {h for h in RATE_HEADERS if "tokens" not in h}
        assert ok.headers["x-ratelimit-remaining-requests"] == str(1000 - 1 - i)  # requests per day
        assert ok.json()["request_id"]  # the upstream was reached
    refused = await edge.chat(key)
    assert refused.status == 429
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["retry-after"] == "20"  # one request of 3/min frees up in 20 s
    assert refused.headers["x-ratelimit-remaining-requests"] == "997"
    assert refused.headers["x-envoy-ratelimited"] == "true"
    assert refused.json() == {
        "error": {
            "message": f"Rate limit reached for model `{M}` in project {pid} on requests per minute: "
            "Limit 3, Used 3, Requested 1. Please try again in 20s.",
            "type": "requests",
            "code": "rate_limit_exceeded",
        }
    }


async def test_the_org_ceiling_is_shared_by_two_projects_and_models_are_separate(client: Client, edge: Edge) -> None:
    org = await client.org("o", [(M, "requests", "minute", 5), (M2, "requests", "minute", 5)])
    _, prod = await client.project(org, "prod", [(M, "requests", "minute", 4)])
    _, dev = await client.project(org, "dev")  # inherits 5/min
    assert [(await edge.chat(prod)).status for _ in range(4)] == [200] * 4
    assert (await edge.chat(dev)).status == 200
    refused = await edge.chat(dev)  # dev is within its own 5, but the organization has used its 5
    assert refused.status == 429 and f"in organization {org}" in refused.json()["error"]["message"]
    assert (await edge.chat(prod)).status == 429
    # Another model has buckets of its own.
    assert (await edge.chat(dev, M2)).status == 200
    assert (await edge.chat(prod, M2)).status == 200


async def test_without_a_valid_api_key_or_model_the_answer_says_why(client: Client, edge: Edge) -> None:
    org = await client.org("o", [(M, "requests", "minute", 5)])
    _, key = await client.project(org, "prod")
    missing = await edge.chat(None)
    assert missing.status == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert "No API key provided" in missing.json()["error"]["message"]
    assert "retry-after" not in missing.headers
    wrong = await edge.chat("sk-not-a-ratelimitd-key")
    assert (wrong.status, wrong.json()["error"]["code"]) == (401, "invalid_api_key")
    # Bytes that are not UTF-8 (sent as Latin-1 by http.client) still reach a refusal.
    latin = await edge.chat("caf\xe9")
    assert (latin.status, latin.json()["error"]["code"]) == (401, "invalid_api_key")
    unknown_model = await edge.chat(key, "gpt-unknown")
    assert (unknown_model.status, unknown_model.json()["error"]["code"]) == (404, "model_not_found")
    too_large = await edge.chat(key, max_tokens=10**6)  # no token limit for M: not too large
    assert too_large.status == 200
    # A route without a rate limit policy is not limited (nor does it need a key).
    models = await edge.get("/v1/models")
    assert models.status == 200 and "x-ratelimit-remaining-requests" not in models.headers


async def wait_reported(redis_client: redis.asyncio.Redis, org: str, request_id: str) -> None:
    """Envoy makes the usage call after the response has gone out: wait until it has landed."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        record = await redis_client.get(keys.OrgKeys(org).request(request_id))
        if record and str(record).split(";")[2]:  # the model reported (lib.lua, rl_record_encode)
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no usage report for {request_id}")


async def test_tokens_charged_at_stream_end_make_the_next_request_wait(
    client: Client, edge: Edge, clock: Clock, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", [(M, "requests", "day", 1000), (M, "tokens", "minute", 1000)])
    _, key = await client.project(org, "prod")
    first = await edge.chat(key, max_tokens=100, usage=1500)  # reserves 100, really uses 1500
    assert first.status == 200 and first.headers["x-ratelimit-remaining-tokens"] == "900"
    await wait_reported(redis_client, org, first.json()["request_id"])
    refused = await edge.chat(key, max_tokens=10)
    assert refused.status == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    # 1500 used of 1000 per minute: 510 tokens must drain first, 30.6 s at 1000/min.
    assert refused.headers["retry-after"] == "31"
    await clock.advance(30)
    assert (await edge.chat(key, max_tokens=10)).status == 429  # the manual clock: nothing refills by itself
    await clock.advance(1)
    again = await edge.chat(key, max_tokens=10)
    assert again.status == 200


async def test_a_reservation_is_refunded_when_usage_is_lower(
    client: Client, edge: Edge, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", [(M, "requests", "day", 1000), (M, "tokens", "minute", 1000)])
    _, key = await client.project(org, "prod")
    first = await edge.chat(key, max_tokens=800, usage=50)
    assert first.headers["x-ratelimit-remaining-tokens"] == "200"
    await wait_reported(redis_client, org, first.json()["request_id"])
    # 800 reserved, 50 used: 750 came back, so 900 fit now.
    second = await edge.chat(key, max_tokens=900)
    assert second.status == 200 and second.headers["x-ratelimit-remaining-tokens"] == "50"


@pytest.mark.parametrize("down", ["ratelimitd", "storage"])
@pytest.mark.parametrize(("failure_mode_deny", "status"), [(False, 200), (True, 503)])
async def test_ratelimitd_or_its_storage_down_fails_open_or_closed_as_envoy_is_told(
    upstream_port: int, tmp_path: Path, down: str, failure_mode_deny: bool, status: int
) -> None:
    valkey = ValkeyProcess(tmp_path)
    valkey.start()
    app = App(settings_for(valkey.url))
    await app.start()
    envoy = start_envoy(tmp_path, upstream_port, app.port, failure_mode_deny)
    edge = Edge(envoy)
    try:
        assert (await edge.chat("rlk_" + "a" * 56)).status == 401  # ratelimitd is answering from storage
        if down == "ratelimitd":
            await app.stop(0)
        else:
            valkey.stop()  # ratelimitd answers UNAVAILABLE
        reply = await edge.chat("rlk_" + "a" * 56)
        assert reply.status == status
        assert "x-envoy-ratelimited" not in reply.headers
        if status == 200:
            assert reply.json()["request_id"]  # let through to the upstream, unlimited
    finally:
        envoy.stop()
        await app.stop(0)
        valkey.stop()
