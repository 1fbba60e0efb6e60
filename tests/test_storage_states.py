"""Storage that is up but not usable: each state against a real Valkey put in it.

LOADING, READONLY, MASTERDOWN, OOM, BUSY and a refused password must all take the
storage-unavailable path, on the hot path and on the control plane alike: the
failure policy applies, health turns NOT_SERVING, the metric counts it, and
service comes back by itself when the state passes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratelimitd.app import App
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import AUTH, channel_client, settings_for
from tests.servers import ValkeyProcess, wait_until
from tests.test_processes import health_status
from tests.test_server import scrape

M = "llama-3.1-8b-instant"
PASSWORD = "s3cret-for-tests"


def admin(valkey: ValkeyProcess, password: str | None = None) -> redis.Redis:
    # no retries: redis-py would otherwise wait out LOADING and BUSY by itself
    return redis.Redis(port=valkey.port, password=password, socket_timeout=10, retry=Retry(NoBackoff(), 0))


def replies_error(client: redis.Redis, code: str, *command: str) -> bool:
    try:
        client.execute_command(*(command or ("PING",)))  # type: ignore[no-untyped-call]
    except redis.RedisError as e:
        return code in f"{type(e).__name__} {e}".upper()
    return False


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@contextmanager
def loading(valkey: ValkeyProcess, tmp: Path) -> Iterator[None]:
    # Incompressible values, loaded 1 ms a key, events served between keys: a few
    # seconds of LOADING after the restart, as a big data set gives in production.
    c = admin(valkey)
    pipe = c.pipeline(transaction=False)
    for i in range(3000):
        pipe.set(f"filler:{i}", os.urandom(1000))
    pipe.execute()
    c.save()
    valkey.stop()
    valkey.start("--key-load-delay", "1000", "--loading-process-events-interval-bytes", "1024", wait_ready=False)
    c = admin(valkey)
    wait_until(lambda: replies_error(c, "LOADING"), "LOADING")
    yield
    wait_until(lambda: answers(c), "the end of loading", timeout_s=60)


@contextmanager
def replica_of(valkey: ValkeyProcess, tmp: Path, *, primary_down: bool) -> Iterator[None]:
    # A second server takes a copy of the data and becomes the primary; ours becomes
    # its replica (READONLY), then, with stale reads off, loses it (MASTERDOWN).
    other = ValkeyProcess(tmp / "primary")
    (tmp / "primary").mkdir()
    other.start()
    c, o = admin(valkey), admin(other)
    try:
        o.replicaof("127.0.0.1", valkey.port)
        wait_until(lambda: o.info("replication")["master_link_status"] == "up", "copy")
        o.replicaof("NO", "ONE")
        c.replicaof("127.0.0.1", other.port)
        wait_until(lambda: c.info("replication").get("master_link_status") == "up", "replica")
        if primary_down:
            c.config_set("replica-serve-stale-data", "no")
            other.stop()
            wait_until(lambda: replies_error(c, "MASTERDOWN", "GET", "x"), "MASTERDOWN")
        else:
            wait_until(lambda: replies_error(c, "READONLY", "SET", "x", "1"), "READONLY")
        yield
    finally:
        c.replicaof("NO", "ONE")
        c.config_set("replica-serve-stale-data", "yes")
        other.stop()


@contextmanager
def out_of_memory(valkey: ValkeyProcess, tmp: Path) -> Iterator[None]:
    c = admin(valkey)
    c.config_set("maxmemory-policy", "noeviction")
    c.config_set("maxmemory", 1)
    yield
    c.config_set("maxmemory", 0)


@contextmanager
def busy(valkey: ValkeyProcess, tmp: Path) -> Iterator[None]:
    c = admin(valkey)
    c.config_set("busy-reply-threshold", 20)
    errors: list[Exception] = []

    def endless_script() -> None:
        try:
            admin(valkey).eval("while true do end", 0)
        except redis.RedisError as e:
            errors.append(e)  # killed: expected

    thread = threading.Thread(target=endless_script)
    thread.start()
    watcher = admin(valkey)
    try:
        wait_until(lambda: replies_error(watcher, "BUSY"), "BUSY")
        yield
    finally:
        watcher.script_kill()
        thread.join(10)
    assert errors and "killed" in str(errors[0]).lower()


@contextmanager
def password_required(valkey: ValkeyProcess, tmp: Path) -> Iterator[None]:
    # The server starts to require a password the URL does not carry (a restart with
    # a new configuration); open connections are dropped, new ones get NOAUTH.
    c = admin(valkey)
    c.config_set("requirepass", PASSWORD)
    c.client_kill_filter(_type="normal", skipme=True)
    yield
    c.config_set("requirepass", "")


@contextmanager
def password_changed(valkey: ValkeyProcess, tmp: Path) -> Iterator[None]:
    # The URL's password was right, then the server's changed: AUTH gets WRONGPASS.
    c = admin(valkey, PASSWORD)
    c.config_set("requirepass", PASSWORD + "-rotated")
    c.client_kill_filter(_type="normal", skipme=True)
    yield
    c.config_set("requirepass", PASSWORD)


STATES: dict[str, Callable[[ValkeyProcess, Path], AbstractContextManager[None]]] = {
    "LOADING": loading,
    "READONLY": lambda v, t: replica_of(v, t, primary_down=False),
    "MASTERDOWN": lambda v, t: replica_of(v, t, primary_down=True),
    "OOM": out_of_memory,
    "BUSY": busy,
    "NOAUTH": password_required,
    "WRONGPASS": password_changed,
}


@pytest.mark.parametrize("state", list(STATES))
async def test_a_storage_state_takes_the_unavailable_path_and_recovers(
    own_valkey: ValkeyProcess, tmp_path: Path, state: str
) -> None:
    url = own_valkey.url
    if state == "WRONGPASS":
        admin(own_valkey).config_set("requirepass", PASSWORD)
        url = f"redis://:{PASSWORD}@127.0.0.1:{own_valkey.port}/0"
    # The server's own clock: the test clock would be read through the control plane
    # first, and this test is about the decision's own storage call.
    app = App(
        settings_for(
            url, manual_clock=False, on_storage_error="allow", health_interval_s=0.05, metrics_listen="127.0.0.1:0"
        )
    )
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    try:
        # a daily limit: the server's real clock refills it too slowly to hide a charge
        org = await client.org("o", [(M, "requests", "day", 100)])
        _, key = await client.project(org, "a")
        req = pb.CheckRequest(api_key=key, model=M)
        assert (await client.decisions.CheckAndConsume(req)).reason == pb.REASON_ALLOWED
        before = await scrape(app.metrics_port)

        with STATES[state](own_valkey, tmp_path):
            reply = await client.decisions.CheckAndConsume(req, timeout=10)
            assert (reply.allowed, reply.reason) == (True, pb.REASON_STORAGE_UNAVAILABLE)  # the policy applied
            assert await health_status(client.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:  # the control plane: a change
                await client.orgs.SetOrganizationLimits(
                    apb.SetOrganizationLimitsRequest(
                        organization_id=org, set=[apb.Limit(model=M, metric="requests", window="day", limit=50)]
                    ),
                    metadata=AUTH,
                    timeout=10,
                )
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
            assert "storage is unavailable" in (e.value.details() or "") and "Error" not in (e.value.details() or "")
            m = await scrape(app.metrics_port)
            assert m["ratelimitd_storage_errors_total"] >= before.get("ratelimitd_storage_errors_total", 0) + 2
            assert m['ratelimitd_decisions_total{outcome="storage_unavailable"}'] == 1
            assert m["ratelimitd_storage_up"] == 0

        deadline = time.monotonic() + 30
        while await health_status(client.channel) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never came back"
            await asyncio.sleep(0.02)  # polls the background probe, no time window
        reply = await client.decisions.CheckAndConsume(req, timeout=10)
        assert (reply.allowed, reply.reason) == (True, pb.REASON_ALLOWED)  # decided by storage again
        assert reply.buckets[0].remaining == 98  # the outage charged nothing
    finally:
        await client.channel.close()
        await app.stop(0)
