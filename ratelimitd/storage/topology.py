"""Which storage a URL names, and the two clients each topology gets.

One URL picks the topology, the way redis-py and `limits` users write it:

    redis://[user:password@]host:port[/db]          one server (rediss:// with TLS, unix:// a socket)
    redis+cluster://[user:password@]host:port[,host:port...]
                                                    a Redis/Valkey Cluster: any reachable nodes
                                                    (rediss+cluster:// with TLS)
    redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]
                                                    a Sentinel-managed primary, asked of the
                                                    sentinels (rediss+sentinel:// with TLS)

Every topology gets two clients: redis-py's (the control plane, usage reads), made
here, and an auto-pipelining one for the hot path that implements engine/scripts.py's
ScriptRunner plus ``call`` (the health probe), made by storage/hot_path.py:
storage/pipelined.py for one server, storage/cluster.py (one pipelined connection per
primary, slot-routed) and storage/sentinel.py (one pipelined connection to the
current primary).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast
from urllib.parse import quote, unquote

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratelimitd.engine.scripts import LuaScript

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
SUPPORTED_SCHEMES = SINGLE_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES


class HotPath(Protocol):
    """The hot path's connection: scripts by sha (ScriptRunner), one command (the health
    probe), close. Raises StorageUnavailable when storage cannot be used."""

    async def evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any: ...

    async def call(self, command: Sequence[str | int | bytes]) -> Any: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StorageTls:
    """TLS toward storage (rediss schemes): the CA that signed the servers' certificates
    (unset: the system's), and a client certificate and key if the servers ask for one."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context

    def redis_py_options(self) -> dict[str, Any]:
        return {"ssl_ca_certs": self.ca, "ssl_certfile": self.cert, "ssl_keyfile": self.key}


@dataclass(frozen=True, slots=True)
class Topology:
    kind: Literal["single", "cluster", "sentinel"]
    url: str
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    service: str = ""
    db: int = 0

    def node_url(self, host: str, port: int) -> str:
        """A redis:// URL for one server of this topology, with its credentials."""
        scheme = "rediss" if self.tls else "redis"
        creds = ""
        if self.password is not None:
            creds = f"{_quote(self.username or '')}:{_quote(self.password)}@"
        return f"{scheme}://{creds}{host}:{port}/{self.db}"


def _quote(text: str) -> str:
    return quote(text, safe="")


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ''}***@{host}"


def parse(url: str) -> Topology:
    """The topology a storage URL names; ValueError (naming the problem, never the password)
    for one that is not valid."""
    if url.startswith(SINGLE_SCHEMES):
        return Topology("single", url, url.startswith("rediss://"))
    if not url.startswith(CLUSTER_SCHEMES + SENTINEL_SCHEMES):
        raise ValueError(f"redis URL {redact(url)!r} must start with one of {', '.join(SUPPORTED_SCHEMES)}")
    scheme, _, rest = url.partition("://")
    kind: Literal["cluster", "sentinel"] = "cluster" if scheme.endswith("+cluster") else "sentinel"
    creds, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    username, password = _credentials(creds)
    nodes = tuple(_host_port(h, url) for h in hosts.split(",") if h.strip())
    if not nodes:
        raise ValueError(f"redis URL {redact(url)!r} names no host:port")
    parts = [p for p in path.split("/") if p]
    service, db = "", 0
    if kind == "cluster" and parts:
        raise ValueError(f"redis URL {redact(url)!r}: a cluster has no database number or path")
    if kind == "sentinel":
        if not parts or len(parts) > 2:
            raise ValueError(f"redis URL {redact(url)!r} must end with /<service name>[/<db>] for Sentinel")
        service = unquote(parts[0])
        if len(parts) == 2:
            if not parts[1].isdigit():
                raise ValueError(f"redis URL {redact(url)!r}: the database {parts[1]!r} is not a number")
            db = int(parts[1])
    return Topology(kind, url, scheme.startswith("rediss"), nodes, username, password, service, db)


def _credentials(creds: str) -> tuple[str | None, str | None]:
    if not creds:
        return None, None
    user, sep, password = creds.partition(":")
    if not sep:  # "secret@host": a password alone, as redis-py reads it
        return None, unquote(user)
    return unquote(user) or None, unquote(password)


def _host_port(text: str, url: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"redis URL {redact(url)!r}: {text.strip()!r} is not host:port")
    return host.strip("[]"), int(port)


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
