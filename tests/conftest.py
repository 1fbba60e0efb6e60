from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.cli import main
from ratelimitd.engine import keys
from ratelimitd.settings import Settings
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import admin_pb2_grpc, ratelimit_pb2_grpc
from tests.servers import ValkeyProcess

OPERATOR_TOKEN = "rlt_test-operator-token"
AUTH = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyProcess]:
    server = ValkeyProcess(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def own_valkey(tmp_path: Path) -> AsyncIterator[ValkeyProcess]:
    """A Valkey of the test's own, for tests that stop it, restart it or change its state."""
    (tmp_path / "own-valkey").mkdir()
    v = ValkeyProcess(tmp_path / "own-valkey")
    v.start()
    yield v
    v.stop()


@pytest.fixture
async def redis_client(valkey: ValkeyProcess) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(valkey.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


class Clock:
    """The manual clock decide.lua reads in tests (microseconds in 'rl:clock')."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        # Near real time, on a whole hour: keys that expire at absolute times
        # (usage buckets) must not be in the past for the server.
        self.now_s = float(time.time() // 3600 * 3600)

    async def set(self, seconds: float) -> None:
        self.now_s = seconds
        await self._client.set(keys.MANUAL_CLOCK, round(seconds * 1_000_000))

    async def advance(self, seconds: float) -> None:
        await self.set(self.now_s + seconds)


@dataclass
class Client:
    channel: grpc.aio.Channel
    decisions: ratelimit_pb2_grpc.RateLimitServiceAsyncStub
    orgs: admin_pb2_grpc.OrganizationServiceAsyncStub
    projects: admin_pb2_grpc.ProjectServiceAsyncStub
    models: admin_pb2_grpc.ModelPermissionServiceAsyncStub
    members: admin_pb2_grpc.MemberServiceAsyncStub
    creds: admin_pb2_grpc.CredentialServiceAsyncStub
    audit: admin_pb2_grpc.AuditServiceAsyncStub

    async def org(self, name: str, limits: list[tuple[str, str, str, int]]) -> str:
        org = await self.orgs.CreateOrganization(apb.CreateOrganizationRequest(name=name), metadata=AUTH)
        await self.orgs.SetOrganizationLimits(
            apb.SetOrganizationLimitsRequest(
                organization_id=org.id, set=[apb.Limit(model=m, metric=me, window=w, limit=v) for m, me, w, v in limits]
            ),
            metadata=AUTH,
        )
        return org.id

    async def project(self, org_id: str, name: str, limits: list[tuple[str, str, str, int]] = ()) -> tuple[str, str]:  # type: ignore[assignment]
        """Creates a project (with custom limits) and one API key; returns (project id, secret)."""
        p = await self.projects.CreateProject(
            apb.CreateProjectRequest(organization_id=org_id, name=name), metadata=AUTH
        )
        if limits:
            await self.projects.SetProjectLimits(
                apb.SetProjectLimitsRequest(
                    organization_id=org_id,
                    project_id=p.id,
                    set=[apb.Limit(model=m, metric=me, window=w, limit=v) for m, me, w, v in limits],
                ),
                metadata=AUTH,
            )
        key = await self.projects.CreateApiKey(
            apb.CreateApiKeyRequest(organization_id=org_id, project_id=p.id, name=f"{name}-key"), metadata=AUTH
        )
        return p.id, key.secret


def channel_client(address: str) -> Client:
    return stubs(grpc.aio.insecure_channel(address))


def stubs(channel: grpc.aio.Channel) -> Client:
    """Our services' stubs on a channel made elsewhere (e.g. with TLS)."""
    return Client(
        channel,
        ratelimit_pb2_grpc.RateLimitServiceStub(channel),
        admin_pb2_grpc.OrganizationServiceStub(channel),
        admin_pb2_grpc.ProjectServiceStub(channel),
        admin_pb2_grpc.ModelPermissionServiceStub(channel),
        admin_pb2_grpc.MemberServiceStub(channel),
        admin_pb2_grpc.CredentialServiceStub(channel),
        admin_pb2_grpc.AuditServiceStub(channel),
    )


# Tests share two cores with other work, so a slow turn of the event loop must not
# read as a storage outage: the production 250 ms would fail calls by chance. Tests
# of timeouts set their own.
TEST_STORAGE_TIMEOUT_MS = 10_000


def settings_for(url: str, **overrides: object) -> Settings:
    defaults: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "redis_url": url,
        "manual_clock": True,
        "operator_token": OPERATOR_TOKEN,
        "storage_timeout_ms": TEST_STORAGE_TIMEOUT_MS,
    }
    return Settings.load(env={}, **{**defaults, **overrides})


@pytest.fixture
async def clock(redis_client: redis.asyncio.Redis) -> Clock:
    c = Clock(redis_client)
    await c.set(c.now_s)
    return c


@pytest.fixture
async def app(valkey: ValkeyProcess, redis_client: redis.asyncio.Redis, clock: Clock) -> AsyncIterator[App]:
    a = App(settings_for(valkey.url))
    await a.start()
    yield a
    await a.stop(0)


@pytest.fixture
async def client(app: App) -> AsyncIterator[Client]:
    c = channel_client(f"127.0.0.1:{app.port}")
    yield c
    await c.channel.close()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


class Cli:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, list(argv))
        out, err = self.capsys.readouterr()
        return code, out, err

    async def ok(self, *argv: str) -> str:
        code, out, err = await self(*argv)
        assert (code, err) == (0, ""), err
        return out

    async def json(self, *argv: str) -> dict[str, object]:
        return json.loads(await self.ok(*argv, "--json"))  # type: ignore[no-any-return]

    async def fails(self, *argv: str, code: int = 1) -> str:
        got, out, err = await self(*argv)
        assert got == code and out == "", (got, out, err)
        assert err.count("\n") == 1 and err.startswith("ratelimitd: "), err
        return err


@pytest.fixture
def cli(app: App, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("RATELIMITD_ADDRESS", f"127.0.0.1:{app.port}")
    monkeypatch.setenv("RATELIMITD_TOKEN", OPERATOR_TOKEN)
    return Cli(capsys)
