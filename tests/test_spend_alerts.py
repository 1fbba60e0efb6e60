"""Spend alerts (issue 14, item 7): each threshold (50/75/90/100 % of a monthly spend limit)
crossed is POSTed once per scope and month to a webhook, signed, retried with back-off, and
recorded in the audit trail. A real receiver on 127.0.0.1; the manual clock for months."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import itertools
import json
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.settings import Settings
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client, Clock, Storage, channel_client, settings_for
from tests.webhook_receiver import Receiver

M = "llama-3.1-8b-instant"
SECRET = "whsec_test-signing-secret"
PRICE = 50.0  # USD per million tokens: $0.10 is 2,000 tokens
_request_ids = itertools.count()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


async def alerting_app(storage: Storage, url: str, **overrides: object) -> App:
    settings = {
        "spend_webhook_url": url,
        "spend_webhook_secret": SECRET,
        "spend_alert_interval_s": 3600.0,  # the tests scan with run_once
        "spend_webhook_backoff_s": 0.01,
        **overrides,
    }
    app = App(settings_for(storage.url, **settings))
    await app.start()
    return app


@pytest.fixture
async def alerting(
    storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock, receiver: Receiver
) -> AsyncIterator[tuple[App, Client]]:
    app = await alerting_app(storage, receiver.url)
    c = channel_client(f"127.0.0.1:{app.port}")
    yield app, c
    await c.channel.close()
    await app.stop(0)


async def priced(
    client: Client, *, project_usd: float | None = None, org_usd: float | None = None
) -> tuple[str, str, str]:
    org = await client.org("acme", [(M, "requests", "minute", 10**6), (M, "tokens", "minute", 10**9)])
    pid, key = await client.project(org, "prod")
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    price = upb.Price(
        organization_id=org,
        model=M,
        input_usd_micros_per_million=round(PRICE * 1e6),
        output_usd_micros_per_million=round(PRICE * 1e6),
    )
    await usage.SetPrice(upb.SetPriceRequest(price=price), metadata=AUTH)
    for project_id, limit in ((pid, project_usd), ("", org_usd)):
        if limit is not None:
            await usage.SetSpendLimit(
                upb.SetSpendLimitRequest(
                    organization_id=org, project_id=project_id, limit_usd_micros=round(limit * 1e6)
                ),
                metadata=AUTH,
            )
    return org, pid, key


async def spend(client: Client, key: str, usd: float) -> None:
    await client.decisions.ReportUsage(
        pb.ReportUsageRequest(
            api_key=key, request_id=f"spend-{next(_request_ids)}", model=M, input_tokens=round(usd / PRICE * 1e6)
        )
    )


async def scan(app: App) -> list[bool]:
    assert app.spend_alerts is not None
    return await app.spend_alerts.run_once()


def alerts(receiver: Receiver) -> list[dict[str, object]]:
    """Every body received, after checking its signature with the shared secret."""
    bodies = []
    for r in receiver.received():
        expected = "sha256=" + hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(r.headers["X-Ratelimitd-Signature"], expected), r
        assert r.headers["Content-Type"] == "application/json" and r.path == "/hooks/spend"
        body = json.loads(r.body)
        assert r.headers["X-Ratelimitd-Alert-Id"] == body["id"]
        bodies.append(body)
    return bodies


async def audit(client: Client, org: str) -> list[apb.AuditEvent]:
    reply = await client.audit.ListAuditEvents(apb.ListAuditEventsRequest(organization_id=org), metadata=AUTH)
    return [e for e in reversed(reply.events) if e.operation.startswith("Spend")]


@pytest.mark.parametrize("scope", ["project", "organization"])
async def test_each_threshold_crossed_is_posted_once_signed_and_audited(
    alerting: tuple[App, Client], receiver: Receiver, scope: str
) -> None:
    app, client = alerting
    limits = {"project_usd": 1.0} if scope == "project" else {"org_usd": 1.0}
    org, pid, key = await priced(client, **limits)
    project = pid if scope == "project" else ""
    assert await scan(app) == []

    await spend(client, key, 0.60)
    assert await scan(app) == [True]
    assert await scan(app) == []  # claimed: never again this month
    await spend(client, key, 0.35)
    assert await scan(app) == [True, True]
    await spend(client, key, 0.10)
    assert await scan(app) == [True]
    assert await scan(app) == []

    got = alerts(receiver)  # one scope's alerts in ascending order, also when one scan finds two
    assert [(a["threshold_percent"], a["spend_usd"]) for a in got] == [(50, 0.6), (75, 0.95), (90, 0.95), (100, 1.05)]
    month = str(got[0]["month"])
    assert got[0] == {
        "type": "spend.threshold_crossed", "id": f"{org}:{project or '-'}:{month}:50", "organization_id": org,
        "project_id": project, "month": month, "threshold_percent": 50, "spend_usd": 0.6, "limit_usd": 1.0,
    }  # fmt: skip

    events = await audit(client, org)
    assert {e.project_id for e in events} == {project}
    assert [(e.operation, json.loads(e.after)["threshold"]) for e in events] == [
        ("SpendThresholdCrossed", 50), ("SpendAlertDelivered", 50),
        ("SpendThresholdCrossed", 75), ("SpendThresholdCrossed", 90),
        ("SpendAlertDelivered", 75), ("SpendAlertDelivered", 90),
        ("SpendThresholdCrossed", 100), ("SpendAlertDelivered", 100),
    ]  # fmt: skip
    delivered = [json.loads(e.after) for e in events if e.operation == "SpendAlertDelivered"]
    assert [(d["attempts"], d["result"]) for d in delivered] == [(1, "HTTP 200")] * 4
    crossed = json.loads(events[0].after)
    assert (crossed["spend_usd"], crossed["limit_usd"], crossed["month"]) == (0.6, 1.0, month)


async def test_a_receiver_failing_twice_gets_retries_and_then_one_delivery(
    alerting: tuple[App, Client], receiver: Receiver
) -> None:
    app, client = alerting
    receiver.failures = 2
    org, _, key = await priced(client, project_usd=1.0)
    await spend(client, key, 0.5)
    assert await scan(app) == [True]
    got = receiver.received()
    assert [r.answered for r in got] == [503, 503, 200]
    assert len({r.body for r in got}) == 1  # the same alert each time
    (delivered,) = [e for e in await audit(client, org) if e.operation == "SpendAlertDelivered"]
    assert json.loads(delivered.after)["attempts"] == 3


async def test_an_alert_never_accepted_is_recorded_as_failed_with_no_secret_or_url_query_anywhere(
    storage: Storage,
    redis_client: redis.asyncio.Redis,
    clock: Clock,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.failures = 100
    app = await alerting_app(storage, receiver.url + "?token=query-secret", spend_webhook_attempts=3)
    client = channel_client(f"127.0.0.1:{app.port}")
    try:
        org, _, key = await priced(client, org_usd=1.0)
        await spend(client, key, 0.5)
        assert await scan(app) == [False]
        assert await scan(app) == []  # claimed once: a failed alert is not sent again
        events = await audit(client, org)
    finally:
        await client.channel.close()
        await app.stop(0)
    assert len(receiver.received()) == 3
    assert [e.operation for e in events] == ["SpendThresholdCrossed", "SpendAlertFailed"]
    assert json.loads(events[1].after) | {"alert_id": ""} == {
        "alert_id": "", "attempts": 3, "month": json.loads(events[0].after)["month"], "result": "HTTP 503",
        "threshold": 50,
    }  # fmt: skip
    said = caplog.text + "".join(e.after for e in events)
    assert "not delivered after 3 tries" in caplog.text
    assert "query-secret" not in said and SECRET not in said


async def test_two_servers_scanning_at_once_deliver_each_alert_once(
    storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock, receiver: Receiver
) -> None:
    apps = [await alerting_app(storage, receiver.url) for _ in range(2)]
    client = channel_client(f"127.0.0.1:{apps[0].port}")
    try:
        _, _, key = await priced(client, project_usd=1.0, org_usd=2.0)
        await spend(client, key, 1.6)  # project: 50, 75, 90, 100; organization: 50, 75
        results = await asyncio.gather(*(scan(a) for a in apps for _ in range(3)))
    finally:
        await client.channel.close()
        for a in apps:
            await a.stop(0)
    assert sum(len(r) for r in results) == 6
    got = alerts(receiver)
    assert sorted((bool(a["project_id"]), a["threshold_percent"]) for a in got) == [
        (False, 50), (False, 75), (True, 50), (True, 75), (True, 90), (True, 100)
    ]  # fmt: skip


async def test_a_new_month_alerts_again_and_each_alert_names_its_month(
    alerting: tuple[App, Client], receiver: Receiver, clock: Clock
) -> None:
    app, client = alerting
    _, _, key = await priced(client, project_usd=1.0)
    await spend(client, key, 0.5)
    assert await scan(app) == [True]
    now = datetime.datetime.fromtimestamp(clock.now_s, datetime.UTC)
    first_of_next = (now.replace(day=1) + datetime.timedelta(days=32)).replace(day=1, hour=0, minute=0, second=0)
    await clock.set(first_of_next.timestamp())
    assert await scan(app) == []  # a new month starts with no spend
    await spend(client, key, 0.5)
    assert await scan(app) == [True]
    assert [a["month"] for a in alerts(receiver)] == [now.strftime("%Y-%m"), first_of_next.strftime("%Y-%m")]


async def test_an_organization_with_its_own_url_gets_its_alerts_there(
    storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock, receiver: Receiver
) -> None:
    own = Receiver()
    # The organizations exist before the alerting server starts, so its settings can name one.
    probe = App(settings_for(storage.url))
    await probe.start()
    client = channel_client(f"127.0.0.1:{probe.port}")
    try:
        first, _, first_key = await priced(client, org_usd=1.0)
        second, _, second_key = await priced(client, org_usd=1.0)
        app = await alerting_app(storage, receiver.url, spend_webhook_org_urls={second: own.url})
        try:
            await spend(client, first_key, 0.5)
            await spend(client, second_key, 0.5)
            assert await scan(app) == [True, True]
        finally:
            await app.stop(0)
    finally:
        await client.channel.close()
        await probe.stop(0)
        own.stop()
    assert [a["organization_id"] for a in alerts(receiver)] == [first]
    assert [json.loads(r.body)["organization_id"] for r in own.received()] == [second]


async def test_the_background_scan_delivers_without_being_asked(
    storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock, receiver: Receiver
) -> None:
    app = await alerting_app(storage, receiver.url, spend_alert_interval_s=0.05)
    client = channel_client(f"127.0.0.1:{app.port}")
    try:
        _, _, key = await priced(client, project_usd=1.0)
        await spend(client, key, 0.5)
        await asyncio.to_thread(receiver.arrived.wait, 30)  # a hang guard, not a timing assertion
    finally:
        await client.channel.close()
        await app.stop(0)
    assert [a["threshold_percent"] for a in alerts(receiver)] == [50]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RATELIMITD_SPEND_WEBHOOK_URL": "http://127.0.0.1:9/h"}, "a spend webhook needs spend_webhook_secret"),
        (
            {"RATELIMITD_SPEND_WEBHOOK_URL": "ftp://example.com/h", "RATELIMITD_SPEND_WEBHOOK_SECRET": "s"},
            "spend_webhook_url: 'ftp://example.com/h' is not an http:// or https:// URL",
        ),
        (
            {"RATELIMITD_SPEND_WEBHOOK_ORG_URLS": "org_1=example.com", "RATELIMITD_SPEND_WEBHOOK_SECRET": "s"},
            "spend_webhook_org_urls org_1: 'example.com' is not an http:// or https:// URL",
        ),
        ({"RATELIMITD_SPEND_WEBHOOK_ATTEMPTS": "0"}, "spend_webhook_attempts must be positive, not 0"),
    ],
)
def test_bad_webhook_settings_are_refused_by_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        Settings.load(env=env)
    assert str(refused.value).startswith(message)


def test_the_signing_secret_is_not_in_the_settings_repr() -> None:
    settings = Settings.load(
        env={"RATELIMITD_SPEND_WEBHOOK_URL": "https://hooks.example.com/x", "RATELIMITD_SPEND_WEBHOOK_SECRET": SECRET}
    )
    assert settings.spend_webhook_secret == SECRET and SECRET not in repr(settings)
