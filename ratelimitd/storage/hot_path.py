"""The hot path's connection for a storage topology: one place that knows every kind.

It sits above the kinds (storage/pipelined.py, cluster.py, sentinel.py) and topology.py, so
none of them imports another's factory and the storage package has no import cycle.
"""

from __future__ import annotations

from ratelimitd.core.storage_url import StorageTls, Topology
from ratelimitd.storage.cluster import ClusterConnection
from ratelimitd.storage.pipelined import PipelinedConnection
from ratelimitd.storage.sentinel import SentinelConnection
from ratelimitd.storage.topology import HotPath


def hot_path_connection(topology: Topology, *, timeout_s: float, tls: StorageTls) -> HotPath:
    context = tls.context() if topology.tls else None
    if topology.kind == "cluster":
        return ClusterConnection(topology, timeout_s=timeout_s, ssl_context=context)
    if topology.kind == "sentinel":
        return SentinelConnection(topology, timeout_s=timeout_s, ssl_context=context)
    return PipelinedConnection(topology.url, timeout_s=timeout_s, ssl_context=context)
