"""The two clients each storage topology gets (core/storage_url.py says which a URL names).

Every topology gets two clients: redis-py's (the control plane, usage reads), made
here, and an auto-pipelining one for the hot path that implements core/scripts.py's
ScriptRunner plus ``call`` (the health probe), made by storage/hot_path.py:
storage/pipelined.py for one server, storage/cluster.py (one pipelined connection per
primary, slot-routed) and storage/sentinel.py (one pipelined connection to the
current primary).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratelimitd.core.scripts import LuaScript
from ratelimitd.core.storage_url import StorageTls, Topology


class HotPath(Protocol):
    """The hot path's connection: scripts by sha (ScriptRunner), one command (the health
    probe), close. Raises StorageUnavailable when storage cannot be used."""

    async def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any: ...

    async def call(self, command: Sequence[str | int | bytes]) -> Any: ...

    async def close(self) -> None: ...


class _ReloadingPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except RedisCluster.ERRORS_ALLOW_RETRY:
            self.cluster_client._initialize = True  # the flag redis-py's own retries set
            raise


class _ClusterClient(RedisCluster):
    """redis-py's cluster client, made to reload its topology after a pipeline that could not
    reach a node. With retries off, its pipelines (which also carry ``exists()``) re-raise a
    connection error without marking the topology stale: after a failover every later call
    would still go to the dead primary."""

    # Options for the plain clients of single nodes (node_client), set by control_plane_client.
    node_options: dict[str, Any]
    _node_clients: dict[tuple[str, int], Redis]

    def node_client(self, key: str) -> Redis:
        """A plain client of the primary that owns ``key``'s slot, for a transaction (WATCH …
        EXEC) on that slot. redis-py's cluster pipeline runs a watching transaction's commands
        through asyncio.run in a thread of its own, on pooled connections of another event
        loop; under load its replies came back out of step (a missing project read as present).
        On one node a transaction is what it is on one server."""
        node = self.get_node_from_key(key)
        if node is None:  # no map yet, or a slot nobody serves: as an outage, like CLUSTERDOWN
            raise redis.exceptions.ConnectionError(f"no cluster node serves the slot of {key!r}")
        address = (str(node.host), int(node.port))
        clients = self.__dict__.setdefault("_node_clients", {})
        if address not in clients:
            clients[address] = Redis(host=address[0], port=address[1], **self.node_options)
        client: Redis = clients[address]
        return client

    async def aclose(self, *args: Any, **kwargs: Any) -> None:
        for client in self.__dict__.get("_node_clients", {}).values():
            await client.aclose()
        await super().aclose(*args, **kwargs)

    def topology_changed(self) -> None:
        """A reply said a slot moved: reload the map before the next call (redis-py's own flag)."""
        self._initialize = True

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise ValueError("a cluster pipeline takes no shard_hint")
        # redis-py's own classes declare an attribute abstract that its __init__ sets
        return _ReloadingPipeline(self, transaction)  # type: ignore[abstract]


def control_plane_client(topology: Topology, *, timeout_s: float, tls: StorageTls, max_connections: int) -> Redis:
    """redis-py's client for the topology. A cluster gets RedisCluster, which runs the same
    commands (each on its key's node) and single-slot transactions; it is returned as
    ``Redis`` because the control plane uses only what both offer."""
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "max_connections": max_connections,
    }
    if topology.tls:
        common.update(tls.redis_py_options())
    if topology.kind == "single":
        return Redis.from_url(topology.url, retry=Retry(NoBackoff(), 0), **common)
    if topology.kind == "cluster":
        cluster = _ClusterClient(
            startup_nodes=[ClusterNode(h, p) for h, p in topology.nodes],
            username=topology.username,
            password=topology.password,
            ssl=topology.tls,
            # No retries, as on one server: redis-py would repeat a write that timed out,
            # which may have been applied. It still follows MOVED/ASK, and after a failed
            # call it reloads the topology, so the next call finds a new primary.
            retry=AsyncRetry(NoBackoff(), 0),
            **common,
        )
        cluster.node_options = {
            **common,
            "username": topology.username,
            "password": topology.password,
            "ssl": topology.tls,
            "retry": Retry(NoBackoff(), 0),
        }
        return cast(Redis, cluster)
    sentinel_options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if topology.tls:
        sentinel_options.update(ssl=True, **tls.redis_py_options())
    sentinel = Sentinel(list(topology.nodes), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    primary = sentinel.master_for(
        topology.service,
        redis_class=Redis,
        username=topology.username,
        password=topology.password,
        db=topology.db,
        ssl=topology.tls,
        retry=Retry(NoBackoff(), 0),
        **common,
    )
    return cast(Redis, primary)
