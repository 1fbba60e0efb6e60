"""Shadow limits (docs/operations.md "Shadow mode"): evaluated and counted, never refusing; real Valkey
(and the cluster backend), the manual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from ratelimitd.app import App
from ratelimitd.cli.errors import NOT_UNDERSTOOD
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import rate_limit_service_pb2 as spb
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Cli, Client, Clock, Storage, channel_client, settings_for
from tests.control import ts

M = "llama-3.1-8b-instant"
RPM = ("requests", "minute")


def limit(value: int, *, shadow: bool = False, model: str = M) -> apb.Limit:
    return apb.Limit(model=model, metric="requests", window="minute", limit=value, shadow=shadow)


async def set_project_limit(client: Client, org: str, project: str, value: int, *, shadow: bool) -> apb.ProjectLimits:
    return await client.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(organization_id=org, project_id=project, set=[limit(value, shadow=shadow)]),
        metadata=AUTH,
    )


async def check(client: Client, key: str) -> pb.CheckResponse:
    return await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))


async def usage_total(client: Client, org: str, start_s: float, granularity: upb.Granularity.ValueType) -> upb.UsageRow:
    reply = await usage_pb2_grpc.UsageServiceStub(client.channel).GetUsage(
        upb.GetUsageRequest(
            organization_id=org,
            start_time=ts(int(start_s) * 1000 - 86_400_000),
            end_time=ts(int(start_s) * 1000 + 86_400_000),
            granularity=granularity,
        ),
        metadata=AUTH,
    )
    return reply.total


def shadow_count(app: App, scope: str, outcome: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "ratelimitd_shadow_refusals_total", {"scope": scope, "outcome": outcome}
    )
    return value or 0.0


async def test_a_shadow_project_limit_admits_everything_and_counts_exactly_what_it_would_refuse(
    client: Client, app: App, clock: Clock
) -> None:
    org = await client.org("o", [(M, *RPM, 100)])
    project, key = await client.project(org, "a")
    limits = await set_project_limit(client, org, project, 3, shadow=True)
    assert [(x.limit, x.shadow) for x in limits.custom] == [(3, True)]
    (effective,) = limits.effective
    assert (effective.custom, effective.custom_shadow, effective.organization_shadow) == (3, True, False)

    replies = [await check(client, key) for _ in range(5)]
    assert all(r.allowed and r.reason == pb.REASON_ALLOWED for r in replies)
    assert [r.HasField("shadow_refusal") for r in replies] == [False, False, False, True, True]
    would = replies[3].shadow_refusal
    assert would.reason == pb.REASON_PROJECT_LIMIT
    assert (would.binding.scope, would.binding.limit, would.binding.shadow) == (pb.SCOPE_PROJECT, 3, True)
    assert would.message == (
        f"Rate limit reached for model `{M}` in project {project} on requests per minute: "
        "Limit 3, Used 3, Requested 1. Please try again in 20s."
    )
    assert replies[3].retry_after_ms == 0
    assert not replies[3].HasField("binding") and replies[3].message == ""
    assert "x-ratelimit-shadow" not in replies[2].headers
    assert replies[3].headers["x-ratelimit-shadow"] == (
        "REASON_PROJECT_LIMIT; scope=project; metric=requests; window=minute; limit=3"
    )
    # admitted: charged to the enforcing organization bucket, every one of them
    org_bucket = [b for b in replies[4].buckets if b.scope == pb.SCOPE_ORGANIZATION]
    assert [(b.remaining, b.shadow) for b in org_bucket] == [(95, False)]

    assert shadow_count(app, "project", "project_limit") == 2
    total = await usage_total(client, org, clock.now_s, upb.GRANULARITY_MINUTE)
    assert (total.requests, dict(total.refusals), dict(total.shadow_refusals)) == (
        5, {}, {"REASON_PROJECT_LIMIT": 2},
    )  # fmt: skip
    logs = await usage_pb2_grpc.UsageServiceStub(client.channel).ListRequestLogs(
        upb.ListRequestLogsRequest(organization_id=org, project_id=project), metadata=AUTH
    )
    assert sorted((e.request_id, e.allowed, e.shadow_reason) for e in logs.entries) == sorted(
        (r.request_id, True, "REASON_PROJECT_LIMIT") for r in replies[3:]
    )

    # Enforced from the very next decision: the same limit, set again without shadow.
    limits = await set_project_limit(client, org, project, 3, shadow=False)
    assert [(x.limit, x.shadow) for x in limits.custom] == [(3, False)]
    refused = await check(client, key)
    assert not refused.allowed and refused.reason == pb.REASON_PROJECT_LIMIT
    assert not refused.HasField("shadow_refusal")


async def test_hour_and_day_usage_keep_the_shadow_counts_through_the_rollup(
    client: Client, app: App, clock: Clock
) -> None:
    org = await client.org("o", [(M, *RPM, 100)])
    project, key = await client.project(org, "a")
    await set_project_limit(client, org, project, 1, shadow=True)
    start = clock.now_s
    assert all([(await check(client, key)).allowed for _ in range(3)])
    await clock.advance(120)  # that minute is finished: the rollup adds it to its hour and day
    await app.rollup.roll(org)
    for granularity in (upb.GRANULARITY_MINUTE, upb.GRANULARITY_HOUR, upb.GRANULARITY_DAY):
        total = await usage_total(client, org, start, granularity)
        assert (total.requests, dict(total.shadow_refusals)) == (3, {"REASON_PROJECT_LIMIT": 2}), granularity


async def test_a_shadow_bucket_is_charged_only_for_what_it_would_have_admitted(client: Client, clock: Clock) -> None:
    """As an enforced limit would be: a refusal charges nothing, so the shadow bucket's level
    (and so its next verdict) is the one enforcing it would give."""
    org = await client.org("o", [(M, *RPM, 100)])
    project, key = await client.project(org, "a")
    await set_project_limit(client, org, project, 2, shadow=True)
    assert [(await check(client, key)).HasField("shadow_refusal") for _ in range(3)] == [False, False, True]
    await clock.advance(30)  # half a minute drains one of 2 per minute
    freed = await check(client, key)
    assert not freed.HasField("shadow_refusal"), "the would-be refusal was charged to the shadow bucket"
    assert (await check(client, key)).shadow_refusal.reason == pb.REASON_PROJECT_LIMIT


async def test_an_enforcing_limit_still_refuses_while_a_shadow_one_would_too(client: Client) -> None:
    org = await client.org("o", [(M, *RPM, 2)])
    project, key = await client.project(org, "a")
    await set_project_limit(client, org, project, 1, shadow=True)
    first, second, third = [await check(client, key) for _ in range(3)]
    assert first.allowed and not first.HasField("shadow_refusal")
    assert second.allowed and second.shadow_refusal.reason == pb.REASON_PROJECT_LIMIT
    # the organization's enforcing limit is reached: refused, and the refusal is the answer
    assert not third.allowed and third.reason == pb.REASON_ORGANIZATION_LIMIT
    assert third.binding.scope == pb.SCOPE_ORGANIZATION and not third.binding.shadow
    assert not third.HasField("shadow_refusal")


async def test_an_organization_shadow_limit_covers_every_project(client: Client, app: App) -> None:
    org = await client.org("o", [])
    await client.orgs.SetOrganizationLimits(
        apb.SetOrganizationLimitsRequest(organization_id=org, set=[limit(2, shadow=True)]), metadata=AUTH
    )
    got = await client.orgs.GetOrganizationLimits(apb.GetOrganizationLimitsRequest(organization_id=org), metadata=AUTH)
    assert [(x.limit, x.shadow) for x in got.limits] == [(2, True)]
    _, a = await client.project(org, "a")
    _, b = await client.project(org, "b")
    replies = [await check(client, key) for key in (a, b, a, b)]
    assert all(r.allowed for r in replies)
    assert [r.shadow_refusal.reason for r in replies[2:]] == [pb.REASON_ORGANIZATION_LIMIT] * 2
    assert replies[3].shadow_refusal.binding.scope == pb.SCOPE_ORGANIZATION
    assert shadow_count(app, "organization", "organization_limit") == 2
    # a shadow limit must not show in what a client reads as its limits
    assert not any(h.startswith("x-ratelimit-limit") for h in replies[3].headers)


async def test_a_shadow_limit_too_small_for_the_request_is_a_would_be_413(client: Client) -> None:
    org = await client.org("o", [(M, *RPM, 100), (M, "tokens", "minute", 10_000)])
    project, key = await client.project(org, "a")
    await client.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(
            organization_id=org,
            project_id=project,
            set=[apb.Limit(model=M, metric="tokens", window="minute", limit=100, shadow=True)],
        ),
        metadata=AUTH,
    )
    reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, tokens=500))
    assert reply.allowed and reply.shadow_refusal.reason == pb.REASON_REQUEST_TOO_LARGE
    tokens = [b for b in reply.buckets if b.metric == "tokens" and b.scope == pb.SCOPE_ORGANIZATION]
    assert [b.remaining for b in tokens] == [9_500]


async def test_a_shadow_project_limit_is_still_held_under_the_organizations(client: Client) -> None:
    org = await client.org("o", [(M, *RPM, 10)])
    project, _ = await client.project(org, "a")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await set_project_limit(client, org, project, 11, shadow=True)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "project limit 11 for llama-3.1-8b-instant requests per minute is above" in str(e.value.details())
    limits = await client.projects.GetProjectLimits(
        apb.GetProjectLimitsRequest(organization_id=org, project_id=project), metadata=AUTH
    )
    assert list(limits.custom) == []


async def test_manage_project_sets_and_clears_shadow_with_the_same_messages(client: Client) -> None:
    org = await client.org("o", [(M, *RPM, 100)])
    project, key = await client.project(org, "a")

    async def manage(value: int, shadow: bool) -> apb.ProjectLimits:
        request = apb.SetProjectLimitsRequest(
            organization_id=org, project_id=project, set=[limit(value, shadow=shadow)]
        )
        reply = await client.decisions.ManageProject(
            spb.ManageProjectRequest(set_project_limits=request), metadata=AUTH
        )
        return reply.limits

    assert [(e.custom, e.custom_shadow) for e in (await manage(1, True)).effective] == [(1, True)]
    assert (await check(client, key)).allowed and (await check(client, key)).allowed
    assert [(e.custom, e.custom_shadow) for e in (await manage(1, False)).effective] == [(1, False)]
    assert (await check(client, key)).reason == pb.REASON_PROJECT_LIMIT


async def test_should_rate_limit_answers_ok_with_the_shadow_header_and_the_enforcing_limit(client: Client) -> None:
    org = await client.org("o", [(M, *RPM, 100)])
    project, key = await client.project(org, "a")
    await set_project_limit(client, org, project, 1, shadow=True)
    descriptor = common_pb.RateLimitDescriptor(
        entries=[
            common_pb.RateLimitDescriptor.Entry(key="api_key", value=key),
            common_pb.RateLimitDescriptor.Entry(key="model", value=M),
        ]
    )
    rls = rls_pb2_grpc.RateLimitServiceStub(client.channel)
    replies = [
        await rls.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="ratelimitd", descriptors=[descriptor]))
        for _ in range(2)
    ]
    assert [r.overall_code for r in replies] == [rls_pb2.RateLimitResponse.OK] * 2
    headers = {h.key: h.value for h in replies[1].response_headers_to_add}
    assert headers["x-ratelimit-shadow"].startswith("REASON_PROJECT_LIMIT; scope=project;")
    (status,) = replies[1].statuses
    assert status.code == rls_pb2.RateLimitResponse.OK
    # the descriptor reports the enforcing limit, not the shadow one that is full
    assert (status.current_limit.requests_per_unit, status.limit_remaining) == (100, 98)


@pytest.fixture
async def shadow_all(storage: Storage, redis_client: object, clock: Clock) -> AsyncIterator[Client]:
    app = App(settings_for(storage.url, shadow_all=True))
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    yield client
    await client.channel.close()
    await app.stop(0)


async def test_shadow_all_makes_every_limit_a_shadow_limit(shadow_all: Client) -> None:
    client = shadow_all
    org = await client.org("o", [(M, *RPM, 1)])
    _, key = await client.project(org, "a")
    first, second = await check(client, key), await check(client, key)
    assert first.allowed and not first.HasField("shadow_refusal")
    assert second.allowed and second.shadow_refusal.reason == pb.REASON_ORGANIZATION_LIMIT
    assert all(b.shadow for b in second.buckets)


async def test_the_cli_sets_shadow_limits_and_check_and_usage_show_them(client: Client, cli: Cli) -> None:
    org = await client.org("o", [(M, *RPM, 100)])
    project, key = await client.project(org, "a")
    out = await cli.ok("project", "limits", org, project, "--model", M, "--set", "rpm=1", "--shadow")
    assert "1 (shadow)" in out
    out = await cli.ok("org", "limits", org)
    assert "MODE" in out and "enforce" in out
    assert (await cli("check", "--api-key", key, "--model", M))[0] == 0
    code, out, _ = await cli("check", "--api-key", key, "--model", M)
    assert code == 0
    assert out.startswith(
        "ALLOWED (shadow: would have been refused by REASON_PROJECT_LIMIT: project requests per minute, limit 1)"
    )
    assert "project (shadow)" in out
    usage = await cli.ok("usage", org)
    header, *_, total = usage.splitlines()
    assert "WOULD REFUSE" in header
    assert total.split()[1:4] == ["2", "0", "1"]  # requests, refused, would refuse
    err = await cli.fails("project", "limits", org, project, "--model", M, "--shadow", code=NOT_UNDERSTOOD)
    assert "--shadow applies to the limits of --set" in err
