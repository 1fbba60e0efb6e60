from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.cli import main
from ratelimitd.core import keys
from ratelimitd.engine import ids
from ratelimitd.settings import Settings
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import admin_pb2_grpc, rate_limit_service_pb2_grpc
from tests.cluster import LocalCluster
from tests.servers import ValkeyProcess

OPERATOR_TOKEN = "rlt_test-operator-token"
AUTH = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyProcess]:
    server = ValkeyProcess(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


BACKENDS = ("valkey", "cluster")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: the run of a behaviour test against the local Valkey Cluster")
    config.addinivalue_line(
        "markers", "single_node(reason): a test that needs one Valkey's internals; it runs on one node only"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One backend table: every test that uses ``storage`` (through ``redis_client``,
    ``app``, ``client``, ``cli``...) runs once on one Valkey and once on a Valkey Cluster,
    unless it is marked ``single_node``. ``-m "not cluster"`` runs the single node only."""
    if "storage" not in metafunc.fixturenames:
        return
    backends: list[object] = ["valkey"]
    if metafunc.definition.get_closest_marker("single_node") is None:
        backends.append(pytest.param("cluster", marks=pytest.mark.cluster))
    metafunc.parametrize("storage", backends, indirect=True, scope="session")


@dataclass
class Storage:
    """The backend a behaviour test runs on: its URL for ratelimitd, and clients on it."""

    kind: str
    url: str
    seed_port: int
    cluster: LocalCluster | None = None

    def client(self) -> redis.asyncio.Redis:
        if self.cluster is None:
            return redis.asyncio.Redis.from_url(self.url, decode_responses=True)
        cluster = redis.asyncio.RedisCluster(host="127.0.0.1", port=self.seed_port, decode_responses=True)
        return cast(redis.asyncio.Redis, cluster)


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # no replicas: the behaviour suite needs three primaries; failover tests start their own
    cluster = LocalCluster(tmp_path_factory.mktemp("backend-cluster"), replicas=False)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def storage(request: pytest.FixtureRequest) -> Storage:
    if request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("local_cluster")
        return Storage("cluster", cluster.url, cluster.primary_ports[0], cluster)
    valkey: ValkeyProcess = request.getfixturevalue("valkey")
    return Storage("valkey", valkey.url, valkey.port)


@pytest.fixture(autouse=True)
def orgs_on_every_primary(request: pytest.FixtureRequest) -> Iterator[None]:
    """On the cluster, the n-th organization a test creates in-process lands on primary
    n % 3: computed ids, so every primary serves organizations in every test that creates
    three, and no run depends on where a random id happened to fall."""
    if "storage" not in request.fixturenames or request.getfixturevalue("storage").cluster is None:
        yield
        return
    cluster: LocalCluster = request.getfixturevalue("storage").cluster
    draw = ids.new_id
    created = itertools.count()

    def placed(kind: str) -> str:
        if kind != "org":
            return draw(kind)
        n = next(created)
        # not start 0: its ids read like the made-up ones tests use for "does not exist"
        return cluster.org_ids_one_per_primary(start=1 + n // 3)[n % 3]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids, "new_id", placed)
        yield


@pytest.fixture
async def own_valkey(tmp_path: Path) -> AsyncIterator[ValkeyProcess]:
    """A Valkey of the test's own, for tests that stop it, restart it or change its state."""
    (tmp_path / "own-valkey").mkdir()
    v = ValkeyProcess(tmp_path / "own-valkey")
    v.start()
    yield v
    v.stop()


@pytest.fixture
async def redis_client(storage: Storage) -> AsyncIterator[redis.asyncio.Redis]:
    client = storage.client()
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
    decisions: rate_limit_service_pb2_grpc.RateLimitServiceAsyncStub
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
        rate_limit_service_pb2_grpc.RateLimitServiceStub(channel),
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
async def app(storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock) -> AsyncIterator[App]:
    a = App(settings_for(storage.url))
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
