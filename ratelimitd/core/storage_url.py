"""Which storage a URL names: the topology, its nodes and credentials, and TLS toward it.

One URL picks the topology, the way redis-py and `limits` users write it:

    redis://[user:password@]host:port[/db]          one server (rediss:// with TLS, unix:// a socket)
    redis+cluster://[user:password@]host:port[,host:port...]
                                                    a Redis/Valkey Cluster: any reachable nodes
                                                    (rediss+cluster:// with TLS)
    redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]
                                                    a Sentinel-managed primary, asked of the
                                                    sentinels (rediss+sentinel:// with TLS)

Plain values, no connection: settings validate a URL with them, and storage/topology.py
makes the clients.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, unquote

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
SUPPORTED_SCHEMES = SINGLE_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES


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
