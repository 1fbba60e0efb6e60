"""ratelimitd on a real Valkey Cluster: three primaries, each with a replica (tests/cluster.py).

The server runs with ``--redis-url redis+cluster://...`` exactly as users run it
(an in-process App): the control plane through redis-py's cluster client, the
hot path through storage/cluster.py. Organizations are placed on given
primaries by choosing their ids (computed, not left to chance). Then a slot
migration (ASK, then MOVED), a primary killed (its replica takes over), and the
cluster's own failure states (CLUSTERDOWN, TRYAGAIN) on the storage-unavailable
path. Day windows on the servers' real clock: nothing refills during a test.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from redis.crc import key_slot

from ratelimitd.app import App
from ratelimitd.core.storage_url import parse
from ratelimitd.engine import ids
from ratelimitd.settings import Settings
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.cluster import LocalCluster, answered
from tests.conftest import AUTH, Client, channel_client, settings_for
from tests.servers import wait_until
from tests.test_processes import health_status
from tests.test_server import scrape

M = "llama-3.3-70b-versatile"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def cluster_settings(cluster: LocalCluster, **overrides: object) -> Settings:
    # the servers' own clock: a manual clock key would live on one primary of three
    return settings_for(cluster.url, manual_clock=False, **overrides)


@pytest.fixture
async def served(cluster: LocalCluster) -> AsyncIterator[tuple[App, Client]]:
    """``ratelimitd serve --redis-url redis+cluster://...`` on an empty cluster."""
    cluster.cluster_client().flushall()
    app = App(cluster_settings(cluster, health_interval_s=0.05, metrics_listen="127.0.0.1:0"))
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    yield app, client
    await client.channel.close()
    await app.stop(0)


@contextmanager
def drawn_ids(org_id: str) -> Iterator[None]:
    """The next organization created gets ``org_id`` (the control plane draws the rest)."""
    draw = ids.new_id
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids, "new_id", lambda kind: org_id if kind == "org" else draw(kind))
        yield


async def worked_example(client: Client, org_id: str) -> dict[str, str]:
    with drawn_ids(org_id):
        org = await client.org("acme", [(M, "requests", "day", 100), (M, "tokens", "day", 10**6)])
    assert org == org_id
    _, prod = await client.project(org, "myapp-prod", [(M, "requests", "day", 80)])
    _, staging = await client.project(org, "myapp-staging", [(M, "requests", "day", 30)])
    _, dev = await client.project(org, "myapp-dev")
    return {"prod": prod, "staging": staging, "dev": dev}


async def admitted(client: Client, secret: str, attempts: int, **kwargs: Any) -> int:
    req = pb.CheckRequest(api_key=secret, model=M)
    replies = await asyncio.gather(*(client.decisions.CheckAndConsume(req, timeout=30) for _ in range(attempts)))
    return sum(r.allowed for r in replies)


async def remaining_requests(client: Client, secret: str) -> int:
    """What a no-op probe (0 tokens, but 1 request) sees left in the organization's day bucket."""
    reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M), timeout=30)
    return min(b.remaining for b in reply.buckets if b.scope == pb.SCOPE_ORGANIZATION and b.metric == "requests")


def slot_of_org(org_id: str) -> int:
    return key_slot(f"rl:{{{org_id}}}:org".encode())


# -- URLs ----------------------------------------------------------------------------


def test_storage_urls_name_their_topology() -> None:
    cluster = parse("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001")
    assert (cluster.kind, cluster.nodes, cluster.username, cluster.password, cluster.tls) == (
        "cluster", (("10.0.0.1", 7000), ("10.0.0.2", 7001)), "u", "p@ss", False,
    )  # fmt: skip
    sentinel = parse("rediss+sentinel://:pw@s1:26379,s2:26379/mymaster/2")
    assert (sentinel.kind, sentinel.service, sentinel.db, sentinel.password, sentinel.tls) == (
        "sentinel", "mymaster", 2, "pw", True,
    )  # fmt: skip
    assert parse("rediss://h:1/0").kind == "single"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://", "names no host:port"),
        ("redis+cluster://h:7000/0", "a cluster has no database"),
        ("redis+cluster://h:notaport", "'h:notaport' is not host:port"),
        ("redis+sentinel://s:26379", "must end with /<service name>"),
        ("redis+sentinel://s:26379/svc/x", "the database 'x' is not a number"),
        ("memcached://h:1", "must start with one of"),
        ("redis+cluster://:secret@h:notaport", "***@"),
    ],
)
def test_a_bad_storage_url_is_refused_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="redis URL") as e:
        Settings.load(env={}, redis_url=url)
    assert problem in str(e.value)
    assert "secret" not in str(e.value)


# -- the behaviour, through the server ---------------------------------------------------


async def test_the_worked_example_on_each_primary(cluster: LocalCluster, served: tuple[App, Client]) -> None:
    _, client = served
    for primary, org_id in enumerate(cluster.org_ids_one_per_primary()):
        assert cluster.primary_of_slot(slot_of_org(org_id)) == primary
        keys = await worked_example(client, org_id)
        assert await admitted(client, keys["prod"], 90) == 80
        assert await admitted(client, keys["staging"], 15) == 15
        assert await admitted(client, keys["dev"], 20) == 5
        refused = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=keys["dev"], model=M))
        assert refused.reason == pb.REASON_ORGANIZATION_LIMIT
    # every organization is listed, though each lives on another primary than the index
    listed = await client.orgs.ListOrganizations(apb.ListOrganizationsRequest(), metadata=AUTH)
    assert sorted(o.id for o in listed.organizations) == sorted(cluster.org_ids_one_per_primary())


async def test_reservations_reconcile_on_each_primary(cluster: LocalCluster, served: tuple[App, Client]) -> None:
    _, client = served
    for org_id in cluster.org_ids_one_per_primary(start=1):
        keys = await worked_example(client, org_id)
        d = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=keys["dev"], model=M, tokens=5000))
        report = await client.decisions.ReportUsage(
            pb.ReportUsageRequest(api_key=keys["dev"], request_id=d.request_id, input_tokens=1000, output_tokens=500)
        )
        assert (report.result, report.token_delta) == (pb.ReportUsageResponse.RESULT_RECONCILED, -3500)
        probe = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=keys["dev"], model=M))
        (tokens,) = [b for b in probe.buckets if b.scope == pb.SCOPE_ORGANIZATION and b.metric == "tokens"]
        assert tokens.remaining == 10**6 - 1500


async def test_no_key_or_model_policy_for_a_project_that_does_not_exist(served: tuple[App, Client]) -> None:
    # redis-py's cluster pipeline never ran a watched EXISTS: both checks passed by mistake
    _, client = served
    org = await client.org("acme", [(M, "requests", "day", 100)])
    missing = ids.new_id("proj")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.projects.CreateApiKey(
            apb.CreateApiKeyRequest(organization_id=org, project_id=missing, name="k"), metadata=AUTH
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and missing in (e.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.models.SetModelPermissions(
            apb.SetModelPermissionsRequest(
                organization_id=org,
                project_id=missing,
                policy=apb.ModelPolicy(access=apb.MODEL_ACCESS_BLOCK_LIST, models=[M]),
            ),
            metadata=AUTH,
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and missing in (e.value.details() or "")


# -- a slot migration: TRYAGAIN, then ASK, then MOVED -----------------------------------


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of the test's own, for tests that move slots or kill nodes."""
    c = LocalCluster(tmp_path / "cluster")
    yield c
    c.stop()


@pytest.fixture
async def served_own(own_cluster: LocalCluster) -> AsyncIterator[tuple[App, Client]]:
    # 3 s: how long TRYAGAIN is retried and how long a dead primary is waited for
    app = App(
        cluster_settings(own_cluster, storage_timeout_ms=3000, health_interval_s=0.05, metrics_listen="127.0.0.1:0")
    )
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    yield app, client
    await client.channel.close()
    await app.stop(0)


def migrate_keys(cluster: LocalCluster, source: int, target: int, keys: list[str]) -> None:
    cluster.client(source).execute_command(  # type: ignore[no-untyped-call]
        "MIGRATE", "127.0.0.1", cluster.ports[target], "", 0, 5000, "KEYS", *keys
    )


async def test_decisions_stay_exact_while_a_slot_migrates(
    own_cluster: LocalCluster, served_own: tuple[App, Client]
) -> None:
    _, client = served_own
    org_id = own_cluster.org_ids_one_per_primary()[0]
    keys = await worked_example(client, org_id)
    assert await admitted(client, keys["prod"], 10) == 10
    slot = slot_of_org(org_id)
    source, target = own_cluster.client(0), own_cluster.client(1)
    source_id, target_id = own_cluster.node_id(0), own_cluster.node_id(1)
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)  # type: ignore[no-untyped-call]
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)  # type: ignore[no-untyped-call]
    in_slot = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)  # type: ignore[no-untyped-call]
    limits = f"rl:{{{org_id}}}:lim:o"
    assert limits in in_slot

    # Half moved: the decision's keys are on both sides, the cluster answers TRYAGAIN
    # until the storage timeout, and nothing is charged.
    migrate_keys(own_cluster, 0, 1, [limits])
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=keys["prod"], model=M), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "TRYAGAIN" in (e.value.details() or "")

    # All moved, the slot not yet handed over: the source answers ASK, the target TRYAGAIN
    # (a decision creates its request record); the decision waits, and runs on the target
    # once the slot is handed over.
    migrate_keys(own_cluster, 0, 1, [k for k in in_slot if k != limits])
    tried = tryagain_count(target)
    waiting = asyncio.ensure_future(
        client.decisions.CheckAndConsume(pb.CheckRequest(api_key=keys["prod"], model=M), timeout=10)
    )
    await asyncio.to_thread(wait_until, lambda: tryagain_count(target) > tried, "a decision asking the target")
    for node in (target, source, own_cluster.client(2)):
        node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)  # type: ignore[no-untyped-call]
    assert (await waiting).allowed
    assert source.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0  # type: ignore[no-untyped-call]

    # Handed over: the source answers MOVED, and the table follows.
    assert await admitted(client, keys["prod"], 80) == 80 - 10 - 1  # the TRYAGAIN charged nothing
    assert await admitted(client, keys["staging"], 15) == 15
    assert await admitted(client, keys["dev"], 20) == 5
    assert own_cluster.primary_of_slot(slot) == 1


def tryagain_count(node: Any) -> int:
    stats = node.info("errorstats")
    return int(stats.get("errorstat_TRYAGAIN", {}).get("count", 0))


# -- a primary fails over to its replica ----------------------------------------------------


async def until_admitted(client: Client, secret: str, deadline_s: float) -> int:
    """Decides until one is admitted again: every failure meanwhile must be a fast
    UNAVAILABLE. Returns how many were refused that way."""
    unavailable = 0
    deadline = time.monotonic() + deadline_s
    while True:
        assert time.monotonic() < deadline, "decisions did not resume by themselves"
        try:
            # 10 s: a hang guard above the 3 s storage timeout
            reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M), timeout=10)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
            unavailable += 1
            continue
        assert reply.allowed
        return unavailable


async def test_a_killed_primary_fails_fast_then_its_replica_takes_over(
    own_cluster: LocalCluster, served_own: tuple[App, Client]
) -> None:
    app, client = served_own
    on_primary = [(await worked_example(client, org_id))["prod"] for org_id in own_cluster.org_ids_one_per_primary()]
    for secret in on_primary:
        assert await admitted(client, secret, 10) == 10
    # what a failover can lose is what the replica has not yet received: here, nothing
    own_cluster.client(0).execute_command("WAIT", 1, 5000)  # type: ignore[no-untyped-call]

    # the replica takes over when told (CLUSTER FAILOVER FORCE), so the outage is seen first
    replica = own_cluster.client(3)
    replica.config_set("cluster-replica-no-failover", "yes")
    own_cluster.kill(0)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as e:  # 10 s: a hang guard above the 3 s storage timeout
            await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=on_primary[0], model=M), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert "storage" in (e.value.details() or "")
    assert await admitted(client, on_primary[1], 5) == 5  # the other primaries answer throughout
    assert await health_status(client.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    replica.execute_command("CLUSTER", "FAILOVER", "FORCE")  # type: ignore[no-untyped-call]
    unavailable = 3 + await until_admitted(client, on_primary[0], deadline_s=60)
    # nothing admitted before the kill was lost, and the outage charged nothing
    assert await admitted(client, on_primary[0], 80) == 80 - 10 - 1
    assert await admitted(client, on_primary[1], 80) == 65
    # the control plane found the new primary too
    org_id = own_cluster.org_ids_one_per_primary()[0]
    _, secret = await answered(lambda: client.project(org_id, "after-failover", [(M, "requests", "day", 7)]))
    assert await admitted(client, secret, 10) == 7
    assert own_cluster.primary_of_slot(slot_of_org(own_cluster.org_ids_one_per_primary()[0])) == 3
    m = await scrape(app.metrics_port)
    assert m["ratelimitd_storage_errors_total"] >= unavailable
    deadline = time.monotonic() + 30
    while await health_status(client.channel) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "health never came back"
        await asyncio.sleep(0.02)  # polls the background probe, no time window


# -- the cluster's failure states are storage failures ---------------------------------------


async def test_clusterdown_takes_the_storage_unavailable_path_and_recovers(cluster: LocalCluster) -> None:
    cluster.cluster_client().flushall()
    app = App(cluster_settings(cluster, on_storage_error="allow", health_interval_s=0.05, metrics_listen="127.0.0.1:0"))
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    org_id = cluster.org_ids_one_per_primary(start=2)[2]
    node = cluster.client(2)
    slot = slot_of_org(org_id)
    try:
        secret = (await worked_example(client, org_id))["dev"]
        assert await admitted(client, secret, 3) == 3
        before = await scrape(app.metrics_port)
        # the primary forgets one of its slots: it then answers CLUSTERDOWN to everything
        node.execute_command("CLUSTER", "DELSLOTS", slot)  # type: ignore[no-untyped-call]
        try:
            wait_until_state(node, "fail")
            reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M), timeout=10)
            assert (reply.allowed, reply.reason) == (True, pb.REASON_STORAGE_UNAVAILABLE)  # the policy applied
            assert await health_status(client.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            m = await scrape(app.metrics_port)
            assert m["ratelimitd_storage_errors_total"] >= before.get("ratelimitd_storage_errors_total", 0) + 1
            assert m['ratelimitd_decisions_total{outcome="storage_unavailable"}'] == 1
        finally:
            node.execute_command("CLUSTER", "ADDSLOTS", slot)  # type: ignore[no-untyped-call]
        wait_until_state(node, "ok")
        deadline = time.monotonic() + 30
        while await health_status(client.channel) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never came back"
            await asyncio.sleep(0.02)  # polls the background probe, no time window
        reply = await decided_by_storage(client, secret)
        assert reply.buckets[0].remaining == 100 - 3 - 1  # the outage charged nothing
    finally:
        await client.channel.close()
        await app.stop(0)


async def decided_by_storage(client: Client, secret: str) -> pb.CheckResponse:
    """The first decision storage makes again (the policy answers until then; it charges nothing)."""
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "decisions did not resume by themselves"
        reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M), timeout=10)
        if reply.reason != pb.REASON_STORAGE_UNAVAILABLE:
            return reply


def wait_until_state(node: Any, state: str) -> None:
    wait_until(lambda: f"cluster_state:{state}" in node.execute_command("CLUSTER", "INFO"), f"cluster_state:{state}")


async def test_a_deleted_project_stops_deciding_on_a_cluster(served: tuple[App, Client]) -> None:
    # redis-py's cluster pipeline refused the RENAME that deletes a project (INTERNAL)
    _, client = served
    org = await client.org("acme", [(M, "requests", "day", 100)])
    project, secret = await client.project(org, "doomed")
    assert await admitted(client, secret, 1) == 1
    await client.projects.DeleteProject(
        apb.DeleteProjectRequest(organization_id=org, project_id=project), metadata=AUTH
    )
    refused = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M))
    assert not refused.allowed and refused.reason == pb.REASON_INVALID_API_KEY


async def test_a_primary_that_stops_answering_fails_its_decisions_within_the_timeout(cluster: LocalCluster) -> None:
    cluster.cluster_client().flushall()
    app = App(cluster_settings(cluster, storage_timeout_ms=1000, health_interval_s=0.05))
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    stopped, other = cluster.org_ids_one_per_primary(start=3)[1:]
    replica = cluster.client(4)  # primary 1's replica stays one while its primary is frozen
    replica.config_set("cluster-replica-no-failover", "yes")
    proc = cluster.procs[1]
    assert proc is not None
    try:
        frozen = (await worked_example(client, stopped))["dev"]
        alive = (await worked_example(client, other))["dev"]
        assert await admitted(client, frozen, 2) == 2
        proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:  # 10 s: a hang guard above the 1 s timeout
                await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=frozen, model=M), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "did not answer within 1000 ms" in (e.value.details() or "")
            assert await admitted(client, alive, 3) == 3  # another primary, answering meanwhile
        finally:
            proc.send_signal(signal.SIGCONT)
        await asyncio.to_thread(wait_until, cluster.healthy, "the cluster again", 30)
        await until_admitted(client, frozen, deadline_s=30)  # decisions resume by themselves
        # the call that timed out may or may not have been applied: at most one more charge
        assert await remaining_requests(client, frozen) in (100 - 2 - 1 - 1, 100 - 2 - 1 - 1 - 1)
    finally:
        replica.config_set("cluster-replica-no-failover", "no")
        await client.channel.close()
        await app.stop(0)
