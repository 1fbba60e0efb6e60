#!/usr/bin/env python3
"""A stand-in for the LLM API behind Envoy, to try envoy.yaml without one (standard library only).

    python3 clients/envoy/upstream.py            # 127.0.0.1:8000, where envoy.yaml sends requests
    python3 clients/envoy/upstream.py --port 8001

Every POST answers 200 with an OpenAI-style chat completion whose ``usage`` counts
the prompt's words and ``max_tokens`` (at most 16) as tokens, and the same total in the
``x-usage-tokens`` header, which envoy.yaml reports to ratelimitd when the response is done.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY_TOKENS = 16


def completion(request: dict[str, Any]) -> dict[str, Any]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
    output = min(int(request.get("max_tokens") or REPLY_TOKENS), REPLY_TOKENS)
    return {
        "object": "chat.completion",
        "model": request.get("model", ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello " * output}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output},
    }


class ChatCompletions(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            request = {}
        answer = completion(request if isinstance(request, dict) else {})
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.send_header("x-usage-tokens", str(answer["usage"]["total_tokens"]))
        self.end_headers()
        self.wfile.write(payload)


def main() -> None:
    parser = argparse.ArgumentParser(description="A stand-in LLM API for trying envoy.yaml.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000, as envoy.yaml expects)")
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), ChatCompletions)
    print(f"stand-in LLM API on http://{args.host}:{server.server_address[1]} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
