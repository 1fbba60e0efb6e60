"""ratelimitd_client against a live server (tests/test_clients.py starts one and sets the env).

The organization's `*` limit gives every model its own bucket of 2 requests and 1,000 tokens a
minute on a stopped clock, so each test asks for a model of its own and counts exactly.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from ratelimitd_client import AsyncClient, Client, Options, RateLimitdError, RateLimitMiddleware
from ratelimitd_client._gen import ratelimit_pb2 as pb

ADDRESS = os.environ.get("RATELIMITD_TEST_ADDRESS", "")
KEY = os.environ.get("RATELIMITD_TEST_KEY_PYTHON", "")
pytestmark = pytest.mark.skipif(not ADDRESS, reason="run by tests/test_clients.py, which starts a live server")


def fresh_model() -> str:
    return f"py-{uuid.uuid4().hex[:12]}"


def unused_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class LoseFirstAnswer(grpc.UnaryUnaryClientInterceptor):
    """The call reaches the server and is decided, but its answer is lost once: what a
    timeout or a dropped connection after sending looks like to the caller."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        self.request_ids.append(request.request_id)
        outcome = continuation(details, request)
        if len(self.request_ids) == 1:
            outcome.result()  # the server has decided and charged
            raise Unavailable()
        return outcome


class Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection lost after the call was sent"


def test_an_admitted_request_carries_the_rate_limit_headers() -> None:
    with Client(ADDRESS) as client:
        decision = client.check(KEY, fresh_model(), tokens=100)
    answer = decision.http()
    assert decision.allowed and answer.status == 200
    assert decision.response.reason == pb.REASON_ALLOWED
    assert answer.headers["x-ratelimit-remaining-requests"] == "1"
    assert answer.headers["x-ratelimit-remaining-tokens"] == "900"
    assert decision.request_id.startswith("req_")


def test_a_refusal_becomes_429_with_retry_after_and_an_openai_style_body() -> None:
    model = fresh_model()
    with Client(ADDRESS) as client:
        assert [client.check(KEY, model).allowed for _ in range(2)] == [True, True]
        refused = client.check(KEY, model)
    answer = refused.http()
    assert answer.status == 429
    assert int(answer.headers["retry-after"]) >= 1
    assert answer.headers["x-ratelimit-remaining-requests"] == "0"
    assert json.loads(answer.body)["error"]["code"] == "rate_limit_exceeded"
    assert json.loads(answer.body)["error"]["type"] == "requests"


def test_a_request_larger_than_the_limit_is_413_and_a_bad_key_401() -> None:
    with Client(ADDRESS) as client:
        assert client.check(KEY, fresh_model(), tokens=1001).http().status == 413
        assert client.check("rl_not-a-key", fresh_model()).http().status == 401


def test_a_lost_answer_is_retried_with_the_same_request_id_and_charged_once() -> None:
    lose = LoseFirstAnswer()
    channel = grpc.intercept_channel(grpc.insecure_channel(ADDRESS), lose)
    model = fresh_model()
    with Client(channel=channel, options=Options(backoff_s=0)) as client:
        decision = client.check(KEY, model, tokens=400)
        # the bucket of 2 requests was charged once: one more fits, then none
        assert [client.check(KEY, model).allowed for _ in range(2)] == [True, False]
    assert len(lose.request_ids) == 4 and lose.request_ids[0] == lose.request_ids[1] == decision.request_id
    assert decision.allowed and decision.response.replayed


@pytest.mark.parametrize(("fail", "status"), [("open", 200), ("closed", 503)])
def test_an_unreachable_service_fails_open_or_closed_as_chosen(fail: str, status: int) -> None:
    options = Options(timeout_s=2, attempts=2, backoff_s=0, fail=fail)  # type: ignore[arg-type]
    with Client(unused_address(), options=options) as client:
        decision = client.check(KEY, fresh_model())
    assert decision.unreachable and decision.allowed is (fail == "open")
    assert decision.http().status == status
    assert b"127.0.0.1" not in decision.http().body and "UNAVAILABLE" in decision.error  # the log's, not the user's


def test_bad_input_raises_with_the_servers_status() -> None:
    with Client(ADDRESS) as client, pytest.raises(RateLimitdError) as raised:
        client.check(KEY, "")
    assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT and "model" in raised.value.details


async def test_async_check_then_report_reconciles_once() -> None:
    async with AsyncClient(ADDRESS) as client:
        decision = await client.check(KEY, fresh_model(), tokens=500)
        first = await client.report(KEY, decision.request_id, input_tokens=100, output_tokens=50)
        again = await client.report(KEY, decision.request_id, input_tokens=100, output_tokens=50)
    assert (first.result, first.token_delta) == (pb.ReportUsageResponse.RESULT_RECONCILED, -350)
    assert again.result == pb.ReportUsageResponse.RESULT_DUPLICATE


async def call_asgi(app: Any, authorization: str | None) -> tuple[int, dict[str, str], bytes]:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


async def test_asgi_middleware_serves_admitted_requests_and_answers_refusals() -> None:
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["state"]["ratelimitd"].request_id)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async with AsyncClient(ADDRESS) as client:
        guarded = RateLimitMiddleware(app, client, model=fresh_model(), tokens=lambda _scope: 10)
        answers = [await call_asgi(guarded, f"Bearer {KEY}") for _ in range(3)]
        missing = await call_asgi(guarded, None)
    assert [status for status, _, _ in answers] == [200, 200, 429] and len(reached) == 2
    assert answers[1][1]["x-ratelimit-remaining-requests"] == "0" and answers[1][2] == b"ok"
    assert "retry-after" in answers[2][1] and json.loads(answers[2][2])["error"]["code"] == "rate_limit_exceeded"
    assert missing[0] == 401 and json.loads(missing[2])["error"]["code"] == "invalid_api_key"
