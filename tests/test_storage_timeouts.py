"""Storage timeouts: a timed-out call may have been applied, and says so; a retry with the
same request id is exact; and a busy event loop is not mistaken for slow storage."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2

from ratelimitd.app import App
from ratelimitd.cli import main
from ratelimitd.storage.pipelined import PipelinedConnection
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import Client, Storage, channel_client, settings_for
from tests.servers import ValkeyProcess
from tests.test_envoy_rls import desc, request, rls
from tests.test_processes import health_status
from tests.test_server import scrape

M = "llama-3.1-8b-instant"
TIMEOUT_MS = 200


@contextmanager
def stalled(valkey: ValkeyProcess) -> Iterator[None]:
    """Storage that takes connections and commands but answers nothing until resumed."""
    assert valkey.proc is not None
    os.kill(valkey.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(valkey.proc.pid, signal.SIGCONT)


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20) -> None:
    """Polls an async condition (a hang guard, not a time window)."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"{what} did not happen"
        await asyncio.sleep(0.01)


async def timed_app(url: str, **overrides: object) -> tuple[App, Client]:
    # The server's own clock: the test clock is read through the control plane, and
    # these tests are about the decision's own storage call.
    settings: dict[str, object] = {
        "manual_clock": False, "storage_timeout_ms": TIMEOUT_MS, "health_interval_s": 0.05,
        "metrics_listen": "127.0.0.1:0",
    }  # fmt: skip
    app = App(settings_for(url, **{**settings, **overrides}))
    await app.start()
    return app, channel_client(f"127.0.0.1:{app.port}")


def remaining(reply: pb.CheckResponse) -> int:
    return int(reply.buckets[0].remaining)


async def test_a_timed_out_decision_may_have_been_applied_and_a_retry_with_the_same_id_charges_once(
    own_valkey: ValkeyProcess,
) -> None:
    app, client = await timed_app(own_valkey.url)
    try:
        # daily limits: the server's real clock refills them too slowly to hide a charge
        org = await client.org("o", [(M, "requests", "day", 10)])
        _, key = await client.project(org, "a")
        other = await client.org("other", [(M, "requests", "day", 10)])
        _, other_key = await client.project(other, "b")
        first = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, request_id="r0"))
        assert remaining(first) == 9

        retried = pb.CheckRequest(api_key=key, model=M, request_id="r1")
        with stalled(own_valkey):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.decisions.CheckAndConsume(retried, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            details = e.value.details() or ""
            assert f"did not answer within {TIMEOUT_MS} ms" in details and "may have been applied" in details
            assert "Retry with the same request_id" in details and "no request_id" not in details
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=other_key, model=M), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "This call had no request_id, so a retry is a new decision" in (e.value.details() or "")
            assert await health_status(client.channel) == health_pb2.HealthCheckResponse.NOT_SERVING

        async def serving() -> bool:
            return bool(await health_status(client.channel) == health_pb2.HealthCheckResponse.SERVING)

        await wait_for(serving, "recovery")
        again = await client.decisions.CheckAndConsume(retried)
        assert again.allowed and remaining(again) == 8  # r1 charged once, whether or not the stalled call was
        assert (await client.decisions.CheckAndConsume(retried)).replayed
        assert remaining(await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))) == 7
    finally:
        await client.channel.close()
        await app.stop(0)


async def test_a_reply_waiting_behind_a_busy_event_loop_is_not_a_storage_timeout(valkey: ValkeyProcess) -> None:
    connection = PipelinedConnection(valkey.url, timeout_s=0.05)
    try:
        assert await connection.call(["PING"]) == "PONG"  # connected
        loop = asyncio.get_running_loop()
        reply = loop.create_task(connection.call(["PING"]))
        # Right after the command is written, the loop blocks for ten timeouts; the
        # reply arrives meanwhile and waits in the socket.
        loop.call_soon(lambda: loop.call_soon(time.sleep, 0.5))
        assert await reply == "PONG"
    finally:
        await connection.close()


async def test_a_reply_that_arrived_while_the_loop_was_busy_is_read_before_the_watchdog_judges(
    valkey: ValkeyProcess,
) -> None:
    # The loop blocks from right after the write until just past the timeout, so the
    # watchdog runs about on time (not late) in the same turn in which the loop sees
    # the reply waiting in the socket: it must judge only once that reply is read.
    connection = PipelinedConnection(valkey.url, timeout_s=0.05)
    try:
        assert await connection.call(["PING"]) == "PONG"  # connected
        loop = asyncio.get_running_loop()
        for _ in range(3):
            reply = loop.create_task(connection.call(["PING"]))
            loop.call_soon(lambda: loop.call_soon(time.sleep, 0.052))
            assert await reply == "PONG"
    finally:
        await connection.close()


async def test_a_busy_event_loop_does_not_turn_decisions_or_health_unavailable(
    storage: Storage, redis_client: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app, client = await timed_app(storage.url, storage_timeout_ms=50)
    busy = True

    async def hog() -> None:
        # every turn of the loop blocks three storage timeouts long, as under CPU starvation
        while busy:
            time.sleep(0.15)  # noqa: ASYNC251 - blocking the loop is the point
            await asyncio.sleep(0)

    try:
        org = await client.org("o", [(M, "requests", "day", 100)])
        _, key = await client.project(org, "a")
        errors_before = (await scrape(app.metrics_port)).get("ratelimitd_storage_errors_total", 0)
        caplog.set_level(logging.WARNING)
        hogging = asyncio.get_running_loop().create_task(hog())
        try:
            req = pb.CheckRequest(api_key=key, model=M)
            replies = await asyncio.gather(*(client.decisions.CheckAndConsume(req, timeout=60) for _ in range(3)))
        finally:
            busy = False
            await hogging
        assert [r.reason for r in replies] == [pb.REASON_ALLOWED] * 3
        assert app.health.serving is True
        assert "storage is unavailable" not in caplog.text
        assert (await scrape(app.metrics_port)).get("ratelimitd_storage_errors_total", 0) == errors_before
    finally:
        await client.channel.close()
        await app.stop(0)


async def test_the_cli_retries_a_timed_out_check_with_the_same_request_id(
    own_valkey: ValkeyProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = await timed_app(own_valkey.url)
    monkeypatch.setenv("RATELIMITD_ADDRESS", f"127.0.0.1:{app.port}")
    try:
        org = await client.org("o", [(M, "requests", "day", 10)])
        _, key = await client.project(org, "a")
        assert remaining(await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))) == 9

        async def a_call_failed() -> bool:
            return bool((await scrape(app.metrics_port)).get("ratelimitd_storage_errors_total", 0) >= 1)

        with stalled(own_valkey):
            check = asyncio.get_running_loop().create_task(
                asyncio.to_thread(main, ["check", "--api-key", key, "--model", M, "--json"])
            )
            await wait_for(a_call_failed, "a timed-out attempt")
        assert await check == 0
        out, _ = capsys.readouterr()
        decision = json.loads(out)
        assert decision["allowed"] and decision["request_id"].startswith("cli_")
        assert decision["buckets"][0]["remaining"] == 8
        assert remaining(await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))) == 7
    finally:
        await client.channel.close()
        await app.stop(0)


@pytest.mark.single_node("it stalls while the one server's pipelined connection has a call in flight")
async def test_the_suite_settings_tolerate_a_busy_event_loop(app: App, client: Client) -> None:
    # The suite's shared settings (settings_for), the test clock included: a loop that
    # stalls longer than the production timeout, as on a loaded CI machine, must not
    # fail a decision by chance.
    org = await client.org("o", [(M, "requests", "day", 100)])
    _, key = await client.project(org, "a")
    busy = True
    pipeline = app.pipeline
    assert isinstance(pipeline, PipelinedConnection)  # one server: the suite's Valkey

    async def hog() -> None:
        give_up = time.monotonic() + 20  # a hang guard
        while busy and time.monotonic() < give_up:
            if pipeline._waiting:  # a storage call is in flight: stall while its reply comes
                time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point
            await asyncio.sleep(0)

    hogging = asyncio.get_running_loop().create_task(hog())
    try:
        reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M), timeout=60)
    finally:
        busy = False
        await hogging
    assert reply.reason == pb.REASON_ALLOWED


async def test_a_timed_out_envoy_decision_says_envoy_decides_not_to_retry(own_valkey: ValkeyProcess) -> None:
    app, client = await timed_app(own_valkey.url)
    try:
        org = await client.org("o", [(M, "requests", "day", 10)])
        _, key = await client.project(org, "a")
        with stalled(own_valkey):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await rls(client).ShouldRateLimit(request(desc(api_key=key, model=M)), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        details = e.value.details() or ""
        # A call still queued behind one in flight is told nothing was applied; one that was sent
        # may have been. Either way Envoy's path never replays: request-id advice would mislead.
        assert "request_id" not in details
        assert "nothing was applied" in details or "failure_mode_deny decides" in details
    finally:
        await client.channel.close()
        await app.stop(0)
