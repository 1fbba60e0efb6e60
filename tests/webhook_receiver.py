"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that keeps each request and
answers 503 to the first ``failures`` of them, 200 to the rest."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple


class Received(NamedTuple):
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


class Receiver:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self.arrived = threading.Event()  # set by the first request
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    status = 503 if len(receiver.requests) < receiver.failures else 200
                    receiver.requests.append(Received(self.path, dict(self.headers.items()), body, status))
                receiver.arrived.set()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass  # the test reads self.requests, not stderr

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/spend"

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
