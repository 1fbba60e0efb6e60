"""clients/envoy/README.md's "Try it", as pasted: its ratelimitd commands, its stand-in upstream
(clients/envoy/upstream.py) and envoy.yaml with a real Envoy, and the 429 it shows."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratelimitd.app import App
from tests.conftest import Cli
from tests.edge import EnvoyProcess, envoy_config, http_request, requires_envoy
from tests.servers import ROOT, free_port

pytestmark = [requires_envoy, pytest.mark.single_node("a documentation example: once is enough")]

ENVOY_DIR = ROOT / "clients" / "envoy"


def try_it_block() -> str:
    readme = (ENVOY_DIR / "README.md").read_text()
    return readme.split("## Try it", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


def ratelimitd_commands() -> list[list[str]]:
    lines = [shlex.split(line, comments=True) for line in try_it_block().splitlines() if line.startswith("ratelimitd")]
    return [argv[1:] for argv in lines if argv[1] != "serve"]


def curl_body() -> str:
    return try_it_block().split("-d '", 1)[1].split("'", 1)[0]


@pytest.fixture
def sample_upstream() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ENVOY_DIR / "upstream.py"), "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and "stand-in LLM API on" in proc.stdout.readline()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def run_commands(cli: Cli) -> str:
    """Runs the README's commands with the ids they print in place of org_... and proj_...; returns the key."""
    found: dict[str, str] = {}
    for argv in ratelimitd_commands():
        argv = [found.get(arg, arg) for arg in argv]
        out = await cli.ok(*argv)
        for placeholder, prefix in (("org_...", "org_"), ("proj_...", "proj_")):
            if placeholder not in found and (m := re.search(rf"\b{prefix}\w+", out)):
                found[placeholder] = m[0]
        if argv[:2] == ["key", "create"]:
            found["key"] = out.splitlines()[0]
    return found["key"]


async def test_the_try_it_example_ends_in_the_429_it_shows(
    cli: Cli, app: App, sample_upstream: int, tmp_path: Path
) -> None:
    key = await run_commands(cli)
    config = envoy_config(
        listen_port=free_port(), admin_port=free_port(), upstream_port=sample_upstream, ratelimitd_port=app.port
    )
    envoy = EnvoyProcess(config, tmp_path)
    envoy.start()
    try:
        headers = {"authorization": f"Bearer {key}"}
        body = json.loads(curl_body())
        replies = [
            await asyncio.to_thread(http_request, envoy.port, "POST", "/v1/chat/completions", body, headers)
            for _ in range(3)
        ]
    finally:
        envoy.stop()
    assert [r.status for r in replies] == [200, 200, 429]
    assert replies[0].json()["usage"]["total_tokens"] > 0
    assert replies[0].headers["x-ratelimit-limit-requests"] == "1000"
    refusal = replies[2].json()["error"]
    assert refusal["code"] == "rate_limit_exceeded" and "Limit 2" in refusal["message"]
