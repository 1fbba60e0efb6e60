"""Process lifecycle: workers that die are restarted, the data directory is locked,
the embedded Valkey comes back by itself, and SIGTERM drains before stopping."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio.client import Monitor

from ratelimitd.v1 import rate_limit_service_pb2_grpc
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import OPERATOR_TOKEN, Client, channel_client
from tests.servers import ROOT, RatelimitdProcess, ValkeyProcess, free_port, wait_until

M = "llama-3.1-8b-instant"
ENV = {"RATELIMITD_OPERATOR_TOKEN": OPERATOR_TOKEN}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


async def health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(reply.status)


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30) -> None:
    """Polls an async condition: a hang guard, never a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"{what} did not happen"
        await asyncio.sleep(0.02)


async def org_with_key(client: Client, limit: int = 1000, window: str = "minute") -> str:
    org = await client.org("o", [(M, "requests", window, limit)])
    _, key = await client.project(org, "a")
    return key


def connection(address: str) -> tuple[grpc.aio.Channel, rate_limit_service_pb2_grpc.RateLimitServiceAsyncStub]:
    """A channel with a TCP connection of its own (channels share connections by default)."""
    channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, rate_limit_service_pb2_grpc.RateLimitServiceStub(channel)


async def allowed(
    client: Client | rate_limit_service_pb2_grpc.RateLimitServiceAsyncStub, key: str, request_id: str = ""
) -> bool:
    stub = client.decisions if isinstance(client, Client) else client
    reply = await stub.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, request_id=request_id), timeout=60)
    return bool(reply.allowed)


@pytest.fixture
async def clock_set(own_valkey: ValkeyProcess) -> None:
    client = redis.asyncio.Redis.from_url(own_valkey.url)
    await client.set("rl:clock", 1_000_000_000_000)
    await client.aclose()


# -- item 5: workers --------------------------------------------------------------------------


async def test_a_worker_killed_with_kill_9_is_restarted_and_calls_keep_being_answered(
    own_valkey: ValkeyProcess, clock_set: None, tmp_path: Path
) -> None:
    server = RatelimitdProcess(
        "--redis-url", own_valkey.url, "--manual-clock", "--workers", "2",
        env={**ENV, "RATELIMITD_WORKER_RESTART_BACKOFF_S": "0.2"}, log=tmp_path / "s.log",
    )  # fmt: skip
    server.start()
    assert server.proc is not None
    supervisor = server.proc.pid
    client = channel_client(server.address)
    try:
        key = await org_with_key(client)
        before = children(supervisor)
        assert len(before) == 2
        wait_until(lambda: all(f"worker pid {pid} serving" in server.output() for pid in before), "both workers")
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: process_gone(victim), "the worker's death")

        async def answered_on_a_new_connection() -> bool:
            # the surviving worker answers meanwhile: the kernel gives new connections to the
            # listeners left (a connection caught in the dying one's queue is reset; clients retry)
            channel, stub = connection(server.address)
            try:
                return await allowed(stub, key)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return False
            finally:
                await channel.close()

        await until(answered_on_a_new_connection, "an answer after the kill")

        async def replaced() -> bool:
            assert server.proc is not None and server.proc.poll() is None, "the supervisor exited"
            now = children(supervisor)
            return len(now) == 2 and victim not in now

        await until(replaced, "a new worker")
        assert server.proc.poll() is None
        newcomer = (children(supervisor) - before).pop()
        # every connection is answered, whichever worker the kernel gives it to
        connections = [connection(server.address) for _ in range(8)]
        try:
            replies = await asyncio.gather(*(allowed(stub, key) for _, stub in connections))
            assert replies == [True] * 8
        finally:
            for channel, _ in connections:
                await channel.close()
    finally:
        await client.channel.close()
        server.stop()
    output = server.output()
    assert f"worker 1 (pid {victim}) was killed by SIGKILL; restarting it in" in output
    assert f"worker 1 restarted (pid {newcomer})" in output


async def test_workers_that_keep_crashing_stop_the_server_with_a_clear_message(
    own_valkey: ValkeyProcess, tmp_path: Path
) -> None:
    server = RatelimitdProcess(
        "--redis-url", own_valkey.url, "--workers", "2",
        env={
            **ENV,
            "RATELIMITD_WORKER_RESTART_BACKOFF_S": "0.05",
            "RATELIMITD_WORKER_CRASH_LIMIT": "4",
            "RATELIMITD_WORKER_CRASH_WINDOW_S": "600",
        },
        log=tmp_path / "s.log",
    )  # fmt: skip
    server.start()
    assert server.proc is not None
    supervisor = server.proc.pid
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while server.proc.poll() is None:  # kill every worker as it appears: a crash loop
        assert time.monotonic() < deadline, "the supervisor never gave up"
        for pid in children(supervisor) - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        await asyncio.sleep(0.02)
    server.stop()
    assert server.proc.returncode == 1
    assert "ratelimitd: workers crashed 4 times within 600 s" in server.output()
    assert "Traceback" not in server.output()


# -- item 6: the data directory -----------------------------------------------------------------


def pid_of_valkey(data: Path) -> int:
    return int((data / "valkey.pid").read_text())


@pytest.mark.parametrize("port", ["another port", "the same port"])
async def test_a_second_server_on_the_same_data_directory_exits_and_leaves_the_first_untouched(
    tmp_path: Path, port: str
) -> None:
    data = tmp_path / "data"
    first = RatelimitdProcess("--data-dir", str(data), env=ENV, log=tmp_path / "first.log")
    first.start()
    assert first.proc is not None
    storage_pid = pid_of_valkey(data)
    client = channel_client(first.address)
    try:
        key = await org_with_key(client)
        assert await allowed(client, key)
        listen = f"127.0.0.1:{first.port if port == 'the same port' else free_port()}"
        second = subprocess.run(  # noqa: ASYNC221 - the first server runs in its own process
            [sys.executable, "-m", "ratelimitd", "serve", "--data-dir", str(data), "--listen", listen],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, **ENV},
        )
        assert second.returncode == 1, second
        if port == "the same port":
            assert "cannot listen on" in second.stderr, second.stderr
        else:
            assert f"data directory {data.resolve()} is in use by another ratelimitd (pid {first.proc.pid})" in (
                second.stderr
            ), second.stderr
        assert "Traceback" not in second.stderr and "listening" not in second.stdout
        # the first server and its storage are untouched
        assert pid_of_valkey(data) == storage_pid and not process_gone(storage_pid)
        assert await allowed(client, key)
        assert await health(client.channel) == SERVING
    finally:
        await client.channel.close()
        first.stop()


async def test_the_embedded_valkey_is_restarted_when_it_dies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = RatelimitdProcess("--data-dir", str(data), env=ENV, log=tmp_path / "s.log")
    server.start()
    client = channel_client(server.address)
    try:
        key = await org_with_key(client, limit=5, window="day")
        assert [await allowed(client, key) for _ in range(3)] == [True] * 3
        storage_pid = pid_of_valkey(data)
        os.kill(storage_pid, signal.SIGKILL)
        wait_until(lambda: process_gone(storage_pid), "the storage server's death")

        async def answered() -> bool:
            # one request id throughout: however many attempts, at most one is charged
            try:
                return await allowed(client, key, "probe")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return False

        await until(answered, "decisions after the storage server died")
        assert pid_of_valkey(data) != storage_pid
        # what the append-only file held is intact: the key, and of the day's 5, 3 + the probe used
        assert [await allowed(client, key) for _ in range(2)] == [True, False]
        await until(lambda: _is(health(client.channel), SERVING), "health SERVING")
    finally:
        await client.channel.close()
        server.stop()
    assert "storage server (pid" in server.output() and "restarting it" in server.output()


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


# -- item 8: drain --------------------------------------------------------------------------------


async def test_sigterm_drains_then_finishes_calls_in_flight(
    own_valkey: ValkeyProcess, clock_set: None, tmp_path: Path
) -> None:
    server = RatelimitdProcess(
        "--redis-url", own_valkey.url, "--manual-clock",
        env={
            **ENV,
            # long enough never to end by themselves here: the test ends the drain with a second signal
            "RATELIMITD_DRAIN_S": "300",
            "RATELIMITD_SHUTDOWN_GRACE_S": "300",
            # calls held in Valkey must stay in flight, not time out
            "RATELIMITD_STORAGE_TIMEOUT_MS": "300000",
        },
        log=tmp_path / "s.log",
    )  # fmt: skip
    server.start()
    assert server.proc is not None
    client = channel_client(server.address)
    storage = redis.asyncio.Redis.from_url(own_valkey.url, decode_responses=True)
    paused = False
    try:
        key = await org_with_key(client)
        assert await health(client.channel) == SERVING
        server.proc.send_signal(signal.SIGTERM)
        await until(lambda: _is(health(client.channel), NOT_SERVING), "health NOT_SERVING")
        # during the drain: still answering, on open connections and on new ones
        assert await allowed(client, key)
        channel, stub = connection(server.address)
        try:
            assert await allowed(stub, key)
        finally:
            await channel.close()

        # Valkey holds every decision script (CLIENT PAUSE WRITE) while reads go on, so each
        # call's clock read, seen with MONITOR, shows that its handler is running
        await storage.execute_command("CLIENT", "PAUSE", 300_000, "WRITE")  # type: ignore[no-untyped-call]
        paused = True
        async with storage.monitor() as monitor:
            in_flight = [asyncio.ensure_future(allowed(client, key, f"r{i}")) for i in range(8)]
            async with asyncio.timeout(30):
                await _clock_reads(monitor, 8)
        assert not any(c.done() for c in in_flight)
        server.proc.send_signal(signal.SIGTERM)  # a second signal ends the drain early

        async def refuses_new_connections() -> bool:
            channel, _ = connection(server.address)
            try:
                await health(channel)
            except grpc.aio.AioRpcError as e:
                return e.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                await channel.close()
            return False

        await until(refuses_new_connections, "the server to stop accepting")
        assert server.proc.poll() is None  # still finishing the 8
        await storage.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        paused = False
        assert await asyncio.gather(*in_flight) == [True] * 8
        assert await asyncio.to_thread(server.proc.wait, 60) == 0
    finally:
        if paused:
            await storage.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        await storage.aclose()
        await client.channel.close()
        server.stop()
    assert "draining" in server.output()


async def _clock_reads(monitor: Monitor, count: int) -> None:
    seen = 0
    while seen < count:
        command = await monitor.next_command()
        seen += command["command"] == "GET rl:clock"


async def test_sigterm_to_the_supervisor_drains_every_worker_and_exits(
    own_valkey: ValkeyProcess, clock_set: None, tmp_path: Path
) -> None:
    server = RatelimitdProcess(
        "--redis-url", own_valkey.url, "--manual-clock", "--workers", "2",
        env={**ENV, "RATELIMITD_DRAIN_S": "0.5", "RATELIMITD_SHUTDOWN_GRACE_S": "5"},
        log=tmp_path / "s.log",
    )  # fmt: skip
    server.start()
    assert server.proc is not None
    workers = children(server.proc.pid)
    wait_until(lambda: all(f"worker pid {pid} serving" in server.output() for pid in workers), "both workers")
    server.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.proc.wait, 60) == 0  # drain + grace, with a generous bound
    server.stop()
    assert server.output().count("draining") == 2
    wait_until(lambda: all(process_gone(p) for p in workers), "workers gone")


def test_settings_for_the_lifecycle_reject_nonsense() -> None:
    from ratelimitd.settings import Settings

    assert Settings.load(env={"RATELIMITD_DRAIN_S": "0"}).drain_s == 0  # no drain: stop at once
    for name, value in [("DRAIN_S", "-1"), ("SHUTDOWN_GRACE_S", "0"), ("WORKER_CRASH_LIMIT", "0")]:
        with pytest.raises(ValueError, match=name.lower()):
            Settings.load(env={f"RATELIMITD_{name}": value})


async def test_ctrl_c_reaches_the_server_not_its_embedded_valkey(tmp_path: Path) -> None:
    """A terminal's Ctrl-C (or `timeout`, or a group kill) signals the whole process group; the
    embedded Valkey must keep serving while ratelimitd drains, and stop only when it is done."""
    data = tmp_path / "data"
    server = RatelimitdProcess(
        "--data-dir", str(data), env={**ENV, "RATELIMITD_DRAIN_S": "2"}, log=tmp_path / "s.log", own_session=True
    )
    server.start()
    assert server.proc is not None
    try:
        valkey_pid = int((data / "valkey.pid").read_text())
        assert os.getpgid(valkey_pid) != os.getpgid(server.proc.pid)
        os.killpg(server.proc.pid, signal.SIGINT)
        assert server.proc.wait(60) == 0
        assert "storage server (pid" not in server.output(), server.output()  # it never died and came back
    finally:
        server.stop()
