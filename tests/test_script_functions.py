"""The hot path's scripts run as FUNCTIONs, and as plain scripts where the server has none."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from ratelimitd.app import App
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import channel_client, settings_for
from tests.servers import ValkeyProcess

M = "llama-3.1-8b-instant"


def script_calls(valkey: ValkeyProcess) -> dict[str, int]:
    """Script calls that ran, by command (a call that found no function or script failed)."""
    stats = redis.Redis(port=valkey.port).info("commandstats")
    ran = {}
    for name in ("fcall", "evalsha", "eval"):
        s = stats.get(f"cmdstat_{name}", {})
        ran[name] = int(s.get("calls", 0)) - int(s.get("failed_calls", 0)) - int(s.get("rejected_calls", 0))
    return ran


async def decisions(valkey: ValkeyProcess, n: int) -> list[bool]:
    """n decisions of one key under an RPM limit of 3, through a server of its own."""
    app = App(settings_for(valkey.url, manual_clock=False))
    await app.start()
    c = channel_client(f"127.0.0.1:{app.port}")
    try:
        org = await c.org("o", [(M, "requests", "minute", 3)])
        _, key = await c.project(org, "p")
        redis.Redis(port=valkey.port).config_resetstat()
        allowed = []
        for _ in range(n):
            reply = await c.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
            allowed.append(reply.allowed)
        return allowed
    finally:
        await c.channel.close()
        await app.stop(0)


@pytest.fixture
async def valkey_without_functions(tmp_path: Path) -> AsyncIterator[ValkeyProcess]:
    # FCALL renamed away: to the server, as to a Redis 6, the command does not exist
    v = ValkeyProcess(tmp_path)
    v.start("--rename-command", "FCALL", "fcall_is_not_for_ratelimitd")
    yield v
    v.stop()


async def test_decisions_are_function_calls_of_a_library_named_by_its_text(own_valkey: ValkeyProcess) -> None:
    assert await decisions(own_valkey, 4) == [True, True, True, False]
    assert script_calls(own_valkey) == {"fcall": 4, "evalsha": 0, "eval": 0}
    libraries = redis.Redis(port=own_valkey.port, decode_responses=True).function_list("ratelimitd_decide_*")
    assert len(libraries) == 1


async def test_a_server_without_functions_runs_the_same_scripts(valkey_without_functions: ValkeyProcess) -> None:
    assert await decisions(valkey_without_functions, 4) == [True, True, True, False]
    # the first call learned that FCALL is unknown; every decision ran as EVALSHA
    assert script_calls(valkey_without_functions) == {"fcall": 0, "evalsha": 4, "eval": 0}
