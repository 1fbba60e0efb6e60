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


@pytest.mark.single_node("INFO commandstats counts one node's commands")
async def test_a_report_of_a_reservation_runs_eleven_commands_inside_valkey(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    dims = [("requests", "minute"), ("requests", "day"), ("tokens", "minute"), ("tokens", "day")]
    org = await client.org("o", [(M, m, w, BIG) for m, w in dims])
    _, key = await client.project(org, "p", [(M, "requests", "minute", BIG), (M, "tokens", "minute", BIG)])
    check = pb.CheckRequest(api_key=key, model=M, tokens=500)
    first = await client.decisions.CheckAndConsume(check)
    await client.decisions.ReportUsage(pb.ReportUsageRequest(api_key=key, request_id=first.request_id, input_tokens=9))
    request_ids = [(await client.decisions.CheckAndConsume(check)).request_id for _ in range(10)]
    await redis_client.config_resetstat()
    for i, request_id in enumerate(request_ids):
        report = pb.ReportUsageRequest(api_key=key, request_id=request_id, input_tokens=300 + i, output_tokens=100)
        assert (await client.decisions.ReportUsage(report)).result == pb.ReportUsageResponse.RESULT_RECONCILED
    ran = await commands_run(redis_client)
    # per report (GETs not counted: the record's, and the test clock's): HMGET key, HMGET
    # state (configuration with the prices, token buckets, usage id), HGET of this minute's,
    # this hour's and this day's counters (none may pass its maximum), HSET state (the
    # token delta), HSET of the minute's counters, and the request log (LPUSH, LTRIM,
    # EXPIRE); SET of the record, now reported
    assert {name: calls // 10 for name, calls in ran.items()} == {
        "hmget": 2, "hget": 3, "hset": 2, "lpush": 1, "ltrim": 1, "expire": 1, "set": 1,
    }  # fmt: skip
