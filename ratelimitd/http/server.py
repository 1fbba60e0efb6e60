"""The HTTP server of one ratelimitd process: an aiohttp application other routes can join.

Life cycle, driven by app.py around the gRPC server's own:

1. ``bind()`` takes the HTTP port before storage starts (a server that cannot listen
   touches nothing), with SO_REUSEPORT among ``--workers`` like the gRPC port;
2. ``add_loopback(grpc_server)`` gives the gRPC server a second port: a Unix socket in a
   private directory, with gRPC's local credentials, which only this process dials;
3. ``start()``, once the gRPC server runs: the RPC routes, /openapi.json, then serving;
4. ``stop(grace_s)``: no new connections, calls in flight get ``grace_s``.

Routes for something else (a console) are added to ``web`` before ``start()``, or by a
function in ``mounts``, which ``start()`` calls with the application and the RPC gateway.
"""

from __future__ import annotations

import importlib.resources
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from aiohttp import web

from ratelimitd.http import connect, cors

OPENAPI_PATH = "/openapi.json"
# As gRPC's default receive limit, so a message either port takes, the other takes too.
MAX_BODY_BYTES = 4 * 1024 * 1024


def openapi_description() -> bytes:
    """The OpenAPI 3.1 description generated from proto/ (scripts/gen_protos.py)."""
    return importlib.resources.files("ratelimitd.http").joinpath("openapi/openapi.json").read_bytes()


class HttpServer:
    def __init__(self, listen: str, cors_origins: Sequence[str], *, share_port: bool = False) -> None:
        self.listen = listen
        self.share_port = share_port
        self.port = 0
        self.web = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[cors.middleware(cors_origins)])
        self._socket: socket.socket | None = None
        self._loopback_dir: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._runner: web.AppRunner | None = None
        self.mounts: list[Callable[[web.Application, connect.Gateway], None]] = []

    def bind(self) -> int:
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        if not port.isdigit():
            raise ValueError(f"http_listen {self.listen!r} is not host:port")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._socket = socket.create_server(
                (host or "0.0.0.0", int(port)), family=family, reuse_port=self.share_port
            )
        except OSError as e:
            raise OSError(f"cannot listen on {self.listen} (HTTP): {e.strerror or e}") from None
        self.port = int(self._socket.getsockname()[1])
        return self.port

    def add_loopback(self, server: grpc.aio.Server) -> None:
        # A directory only this user can enter: the socket skips the gRPC port's TLS, if any.
        self._loopback_dir = tempfile.mkdtemp(prefix="ratelimitd-http-")
        target = f"unix:{Path(self._loopback_dir) / 'grpc.sock'}"
        server.add_secure_port(target, grpc.local_server_credentials(grpc.LocalConnectionType.UDS))
        self._channel = grpc.aio.secure_channel(target, grpc.local_channel_credentials(grpc.LocalConnectionType.UDS))

    async def start(self, services: Sequence[str], grace_s: float) -> None:
        assert self._socket is not None and self._channel is not None, "bind() and add_loopback() come first"
        unary, streaming = connect.rpc_table(services, self._channel)
        gateway = connect.Gateway(unary, streaming, MAX_BODY_BYTES)
        description = openapi_description()

        async def openapi(_: web.Request) -> web.Response:
            return web.Response(body=description, content_type="application/json")

        self.web.router.add_get(OPENAPI_PATH, openapi)
        self.web.router.add_route("*", connect.RPC_PATH, gateway.handle)
        for mount in self.mounts:
            mount(self.web, gateway)
        # No access log: one line per decision would be the busiest thing in the log.
        self._runner = web.AppRunner(self.web, access_log=None, handle_signals=False, shutdown_timeout=grace_s)
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        elif self._socket is not None:
            self._socket.close()
        if self._channel is not None:
            await self._channel.close()
        if self._loopback_dir is not None:
            shutil.rmtree(self._loopback_dir, ignore_errors=True)
