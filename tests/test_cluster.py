"""The hot path on a real Redis Cluster (three Valkey primaries).

Every key of one organization carries the hash tag {org_...}, so decide.lua and
report.lua run on one node whatever the organization. Organizations are built
by the real control plane on a single Valkey and moved into the cluster key by
key (DUMP/RESTORE); then the production Decider and Usage run the worked
example and a reconciliation through a cluster client, with organizations on
different nodes.
"""

from __future__ import annotations

import functools
import itertools
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from ratelimitd.app import App
from ratelimitd.engine import ids
from ratelimitd.engine.decisions import Caller, Decider, Outcome
from ratelimitd.engine.limits import Dimensions
from ratelimitd.engine.retention import Retention
from ratelimitd.engine.scripts import LuaScript, Scripts
from ratelimitd.engine.usage import ReportResult, Usage
from ratelimitd.storage.embedded import find_server_binary
from tests.conftest import settings_for
from tests.servers import ValkeyProcess, answers_ping, free_port, stop_process, wait_until

M = "llama-3.3-70b-versatile"
DAY = 86400  # day windows: nothing refills while the test runs on the real clock


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


class Cluster:
    def __init__(self, root: Path) -> None:
        # three data ports and three cluster-bus ports (by default the bus is port + 10000,
        # which may be taken or above 65535); free_port() may hand out a port twice
        ports: list[int] = []
        while len(ports) < 6:
            if (port := free_port()) not in ports:
                ports.append(port)
        self.ports, self.bus_ports = ports[:3], ports[3:]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.bounds = [0, 5461, 10923, 16384]
        try:
            self._form(root)
        except BaseException:
            self.stop()
            raise

    def _form(self, root: Path) -> None:
        for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
            d = root / str(port)
            d.mkdir()
            self.procs.append(
                subprocess.Popen(
                    [find_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-port", str(bus_port),
                     "--cluster-config-file", "nodes.conf", "--dir", str(d), "--save", "", "--appendonly", "no",
                     "--logfile", str(d / "valkey.log")],
                    stdout=subprocess.DEVNULL,
                )
            )  # fmt: skip
        nodes = [redis.Redis(host="127.0.0.1", port=p, socket_timeout=2) for p in self.ports]
        for node, proc in zip(nodes, self.procs, strict=True):
            wait_until(functools.partial(answers_ping, node), "a cluster node", alive=functools.partial(_alive, proc))
        for i, node in enumerate(nodes):
            node.execute_command("CLUSTER", "ADDSLOTSRANGE", self.bounds[i], self.bounds[i + 1] - 1)  # type: ignore[no-untyped-call]
        for port, bus_port in zip(self.ports[1:], self.bus_ports[1:], strict=True):
            nodes[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus_port)  # type: ignore[no-untyped-call]
        wait_until(
            lambda: all(b"cluster_state:ok" in n.execute_command("CLUSTER", "INFO") for n in nodes),  # type: ignore[no-untyped-call]
            "the cluster",
        )

    def node_of(self, key: str) -> int:
        slot = key_slot(key.encode())
        return next(i for i in range(3) if self.bounds[i] <= slot < self.bounds[i + 1])

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


class ClusterScripts:
    """A ScriptRunner over redis-py's cluster client: EVALSHA goes to the node of its keys."""

    def __init__(self, client: RedisCluster) -> None:
        self.client = client

    async def evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await self.client.script_load(script.source)
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)


_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def org_ids_one_per_node(cluster: Cluster) -> list[str]:
    """Organization ids whose hash tags land on node 0, 1 and 2: computed, not left to chance."""
    found: dict[int, str] = {}
    for n in itertools.count():
        candidate = "org_" + "".join(_BASE32[(n >> (5 * i)) & 31] for i in range(12))
        found.setdefault(cluster.node_of(f"rl:{{{candidate}}}:lim:o"), candidate)
        if len(found) == 3:
            return [found[node] for node in range(3)]
    raise AssertionError("unreachable")


async def create_organization_as(single: App, org_id: str) -> str:
    """The control plane's own create_organization, with the id it draws chosen by the test."""
    draw = ids.new_id
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids, "new_id", lambda kind: org_id if kind == "org" else draw(kind))
        org = await single.control.create_organization("acme")
    assert org.id == org_id
    return org.id


async def build_org(
    single: App, projects: dict[str, int | None], org_id: str | None = None
) -> tuple[str, dict[str, Caller]]:
    """The worked example's organization, built by the real control plane on one Valkey."""
    c = single.control
    org_id = await create_organization_as(single, org_id) if org_id else (await c.create_organization("acme")).id
    await c.set_organization_limits(org_id, [(M, "requests", "day", 100), (M, "tokens", "day", 10**6)], [])
    callers = {}
    for name, custom in projects.items():
        p = await c.create_project(org_id, name)
        if custom is not None:
            await c.set_project_limits(org_id, p.id, [(M, "requests", "day", custom)], [])
        _, secret = await c.create_api_key(org_id, p.id, "k")
        parsed = ids.parse_api_key(secret)
        assert parsed is not None
        callers[name] = Caller(parsed.org_id, parsed.key_id, parsed.hash, "")
    return org_id, callers


async def move_into(cluster_client: RedisCluster, single: redis.asyncio.Redis, org_id: str) -> None:
    async for key in single.scan_iter(f"rl:{{{org_id}}}:*"):
        dump = await single.dump(key)
        assert dump is not None
        await cluster_client.restore(key, 0, dump, replace=True)


@pytest.fixture
async def setup(cluster: Cluster, valkey: ValkeyProcess, redis_client: redis.asyncio.Redis, clock: object) -> Any:
    single = App(settings_for(valkey.url))
    await single.start()
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
    await client.initialize()
    await client.flushall()
    scripts = Scripts(client)  # type: ignore[arg-type]
    dims = Dimensions({"minute": 60, "day": DAY})
    runner = ClusterScripts(client)
    decider = Decider(runner, scripts, dims, Retention())
    usage = Usage(client, runner, scripts, dims, single.control, Retention())  # type: ignore[arg-type]

    async def org(projects: dict[str, int | None], org_id: str | None = None) -> dict[str, Caller]:
        org_id, callers = await build_org(single, projects, org_id)
        await move_into(client, redis_client, org_id)
        return callers

    yield decider, usage, org
    await client.aclose()
    await single.stop(0)


async def admitted(decider: Decider, caller: Caller, n: int) -> int:
    return sum([(await decider.check(caller, M, 1, 0)).allowed for _ in range(n)])


async def test_the_worked_example_on_a_cluster(setup: Any, cluster: Cluster) -> None:
    decider, _, org = setup
    for node, org_id in enumerate(org_ids_one_per_node(cluster)):  # one organization on each node
        callers = await org({"myapp-prod": 80, "myapp-staging": 30, "myapp-dev": None}, org_id)
        assert cluster.node_of(f"rl:{{{callers['myapp-prod'].organization_id}}}:lim:o") == node
        assert await admitted(decider, callers["myapp-prod"], 90) == 80
        assert await admitted(decider, callers["myapp-staging"], 15) == 15
        assert await admitted(decider, callers["myapp-dev"], 20) == 5
        refused = await decider.check(callers["myapp-dev"], M, 1, 0)
        assert refused.outcome is Outcome.ORGANIZATION_LIMIT


async def test_reservations_reconcile_on_a_cluster(setup: Any) -> None:
    decider, usage, org = setup
    callers = await org({"a": None})
    d = await decider.check(callers["a"], M, 1, 5000)
    report = await usage.report(callers["a"], d.request_id, "", 1000, 500, 0)
    assert (report.result, report.token_delta) == (ReportResult.RECONCILED, -3500)
    probe = await decider.check(callers["a"], M, 1, 0)
    (tokens,) = [b for b in probe.buckets if b.dimension.metric == "tokens"]
    assert tokens.remaining == 10**6 - 1500
