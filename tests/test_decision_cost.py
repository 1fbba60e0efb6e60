"""What one decision costs inside Valkey, in commands (issue 9, item 1).

Not a timing test: Valkey counts every command a script runs in INFO commandstats,
so the number of commands per decision is exact. The case is the issue's: an
organization with RPM/RPD/TPM/TPD limits, a project with RPM/TPM limits, a token
estimate; six buckets evaluated and charged by every decision."""

from __future__ import annotations

import pytest
import redis.asyncio

from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import Client

M = "llama-3.1-8b-instant"
BIG = 10**11
# The script's own entry and what is not the script's: the server's health probe, our reset,
# and the test clock, which the server reads with a GET of rl:clock before each call
# (engine/clock.py; a decision with a server-made request id reads no record).
NOT_NESTED = {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro", "ping", "config|resetstat", "get"}


async def commands_run(r: redis.asyncio.Redis) -> dict[str, int]:
    stats = await r.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(v["calls"])
        for name, v in stats.items()
        if name.removeprefix("cmdstat_") not in NOT_NESTED
    }


@pytest.mark.single_node("INFO commandstats counts one node's commands")
async def test_a_decision_runs_five_commands_inside_valkey(client: Client, redis_client: redis.asyncio.Redis) -> None:
    dims = [("requests", "minute"), ("requests", "day"), ("tokens", "minute"), ("tokens", "day")]
    org = await client.org("o", [(M, m, w, BIG) for m, w in dims])
    _, key = await client.project(org, "p", [(M, "requests", "minute", BIG), (M, "tokens", "minute", BIG)])
    check = pb.CheckRequest(api_key=key, model=M, tokens=500)
    assert (await client.decisions.CheckAndConsume(check)).allowed  # configuration cached, usage id given
    await redis_client.config_resetstat()
    for _ in range(10):
        reply = await client.decisions.CheckAndConsume(check)
        assert reply.allowed and len(reply.buckets) == 6
    ran = await commands_run(redis_client)
    # per decision: HMGET key, HMGET state, HSET state, HINCRBY usage, SET request record
    # (the test clock is passed in, so no TIME; the key's last use and the state's expiry
    # are written at most once a second and once a minute)
    assert {name: calls // 10 for name, calls in ran.items()} == {"hmget": 2, "hset": 1, "hincrby": 1, "set": 1}
