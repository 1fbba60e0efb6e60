"""Every key a full flow writes is one core/keys.py describes, in its organization's slot,
and lives no longer than the layout says."""

from __future__ import annotations

import redis.asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from redis.crc import key_slot

from ratelimitd.app import App
from ratelimitd.core import keys
from ratelimitd.core.keys import Lifetime
from ratelimitd.engine.audit import Audit
from ratelimitd.engine.clock import manual_clock
from ratelimitd.engine.spend_alerts import SpendAlerts
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, OPERATOR_TOKEN, Client, Clock

M = "llama-3.1-8b-instant"


async def full_flow(client: Client, app: App, clock: Clock) -> str:
    """Control plane, decisions, usage reports and queries, rollup: every kind of write."""
    org = await client.org("layout", [(M, "requests", "minute", 3), (M, "tokens", "minute", 10_000)])
    pid, key = await client.project(org, "p", [(M, "requests", "minute", 2)])
    gone, _ = await client.project(org, "gone")
    await client.projects.DeleteProject(apb.DeleteProjectRequest(organization_id=org, project_id=gone), metadata=AUTH)
    member = await client.members.AddMember(
        apb.AddMemberRequest(organization_id=org, name="dev@example.com", role=apb.ROLE_DEVELOPER), metadata=AUTH
    )
    await client.creds.CreateCredential(
        apb.CreateCredentialRequest(organization_id=org, member_id=member.member.id, name="ci"), metadata=AUTH
    )
    await client.creds.CreateCredential(apb.CreateCredentialRequest(name="operator-2"), metadata=AUTH)
    policy = apb.ModelPolicy(access=apb.MODEL_ACCESS_ALLOW_LIST, models=[M])
    await client.models.SetModelPermissions(
        apb.SetModelPermissionsRequest(organization_id=org, project_id=pid, policy=policy), metadata=AUTH
    )
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    price = upb.Price(
        organization_id=org, model=M, input_usd_micros_per_million=1_000_000, output_usd_micros_per_million=2_000_000
    )
    await usage.SetPrice(upb.SetPriceRequest(price=price), metadata=AUTH)
    await usage.SetSpendLimit(
        upb.SetSpendLimitRequest(organization_id=org, project_id=pid, limit_usd_micros=100_000_000), metadata=AUTH
    )
    await usage.SetUsageSettings(
        upb.SetUsageSettingsRequest(
            settings=upb.UsageSettings(organization_id=org, cached_tokens_count_toward_limits=True)
        ),
        metadata=AUTH,
    )

    admitted = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, tokens=100, request_id="a"))
    await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, tokens=100))
    refused = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, tokens=100))
    assert admitted.allowed and not refused.allowed
    await client.decisions.ReportUsage(
        pb.ReportUsageRequest(api_key=key, request_id="a", model=M, input_tokens=50, output_tokens=20)
    )
    since, until = Timestamp(seconds=int(clock.now_s - 3600)), Timestamp(seconds=int(clock.now_s + 3600))
    await usage.GetUsage(
        upb.GetUsageRequest(organization_id=org, granularity=upb.GRANULARITY_MINUTE, start_time=since, end_time=until),
        metadata=AUTH,
    )
    await usage.ListRequestLogs(upb.ListRequestLogsRequest(organization_id=org, project_id=pid), metadata=AUTH)
    await usage.GetSpend(upb.GetSpendRequest(organization_id=org), metadata=AUTH)
    # a spend limit the report above passed: its alerts are claimed (engine/spend_alerts.py)
    await usage.SetSpendLimit(upb.SetSpendLimitRequest(organization_id=org, limit_usd_micros=10), metadata=AUTH)
    assert await SpendAlerts(app.redis, Audit(app.redis, 100), clock=manual_clock(app.redis)).claim(org)
    # a console sign-in: a platform key of its own, which must expire (engine/sessions.py)
    assert app.credentials.sessions is not None
    await app.credentials.sessions.create(OPERATOR_TOKEN)
    await clock.advance(120)  # the minutes above are finished: they roll up into hours and days
    await app.rollup.roll(org)
    return org


async def test_every_key_written_is_in_the_layout(
    client: Client, app: App, clock: Clock, redis_client: redis.asyncio.Redis
) -> None:
    org = await full_flow(client, app, clock)
    written = sorted({k.decode() if isinstance(k, bytes) else k async for k in redis_client.scan_iter(count=1000)})
    kinds = {name: keys.kind_of(name) for name in written}
    assert [name for name, kind in kinds.items() if kind is None] == []

    tagged = [name for name, kind in kinds.items() if kind is not None and kind.organization]
    assert all(name.startswith(keys.org_prefix(org)) for name in tagged)
    assert {key_slot(name.encode()) for name in tagged} == {key_slot(keys.OrgKeys(org).state.encode())}

    expiring = [name for name, kind in kinds.items() if kind is not None and kind.lifetime is Lifetime.EXPIRES]
    assert {name: await redis_client.pttl(name) for name in expiring if await redis_client.pttl(name) <= 0} == {}
    # the flow reached every kind of organization key the layout names
    reached = {kind.pattern.pattern for kind in kinds.values() if kind is not None}
    assert {k.pattern.pattern for k in keys.LAYOUT if k.organization} <= reached
    assert any(name.startswith(keys.CONSOLE_SESSION_PREFIX) for name in expiring)
