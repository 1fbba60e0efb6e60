"""The Go, TypeScript and Python client suites, each run by its own tool against one live server.

One `ratelimitd serve` (on its own Valkey, clock stopped so no bucket refills mid-suite) is
started for the module; each language gets its own project and key, so the suites never share a
bucket. Every client test asks for models of its own (the organization's `*` limit gives each model
its own bucket: 2 requests and 1,000 tokens). Each client README's example is run as pasted,
against the same server. A language whose toolchain this machine lacks is skipped, naming the
missing tool; CI has all three.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest
import redis

from tests.conftest import OPERATOR_TOKEN, channel_client
from tests.servers import ROOT, RatelimitdProcess, ValkeyProcess

CLIENTS = ROOT / "clients"
# Generous: a first `go test` compiles grpc (a minute on two busy cores); a hang guard only.
SUITE_TIMEOUT_S = 600
README_MODEL = "llama-3.1-8b-instant"
LIMITS = [
    ("*", "requests", "minute", 2),
    ("*", "tokens", "minute", 1000),
    (README_MODEL, "requests", "minute", 1000),
    (README_MODEL, "tokens", "minute", 1_000_000),
]


async def seed(address: str) -> dict[str, str]:
    client = channel_client(address)
    try:
        org = await client.org("clients", LIMITS)
        keys = {lang: (await client.project(org, f"{lang}-suite"))[1] for lang in ("go", "typescript", "python")}
    finally:
        await client.channel.close()
    return {f"RATELIMITD_TEST_KEY_{lang.upper()}": key for lang, key in keys.items()}


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment a client suite reads: the server's address and an API key of its own."""
    tmp = tmp_path_factory.mktemp("clients")
    valkey = ValkeyProcess(tmp)
    valkey.start()
    redis.Redis(port=valkey.port).set("rl:clock", 1_000_000_000_000)
    server = RatelimitdProcess(
        "--redis-url",
        valkey.url,
        "--manual-clock",
        "--header-windows",
        "requests=minute,tokens=minute",
        env={"RATELIMITD_OPERATOR_TOKEN": OPERATOR_TOKEN},
        log=tmp / "s.log",
    )
    try:
        server.start()
        keys = asyncio.run(seed(server.address))
        yield {"RATELIMITD_TEST_ADDRESS": server.address, **keys}
    finally:
        server.stop()
        valkey.stop()


def run_suite(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=SUITE_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-6000:]}"
    return result.stdout


def require(tool: str, what: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.skip(f"{tool} is not on PATH: the {what} client suite needs it")
    return found


def test_python_client_suite_against_a_live_server(live_server: dict[str, str]) -> None:
    output = run_suite(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], CLIENTS / "python", live_server
    )
    assert " passed" in output and "skipped" not in output, output


def test_go_client_suite_against_a_live_server(live_server: dict[str, str]) -> None:
    go = require("go", "Go")
    output = run_suite([go, "test", "-count=1", "-v", "./..."], CLIENTS / "go", live_server)
    assert "--- PASS" in output and "--- SKIP" not in output, output


def test_typescript_client_suite_against_a_live_server(live_server: dict[str, str]) -> None:
    npm = require("npm", "TypeScript")
    require("node", "TypeScript")
    package = CLIENTS / "typescript"
    if not (package / "node_modules").exists():
        run_suite([npm, "ci", "--no-audit", "--no-fund"], package, {})
    output = run_suite([npm, "test", "--silent"], package, live_server)
    assert "# pass " in output and "# skipped 0" in output and "# fail 0" in output, output


def readme_example(language: str, fence: str) -> str:
    """The first `fence` code block under the README's "## Example" heading."""
    text = (CLIENTS / language / "README.md").read_text()
    section = text.split("\n## Example\n", 1)[1]
    found = re.search(rf"```{fence}\n(.*?)```", section, re.DOTALL)
    assert found, f"clients/{language}/README.md has no {fence} example"
    return found.group(1)


def readme_env(live_server: dict[str, str], language: str) -> dict[str, str]:
    key = live_server[f"RATELIMITD_TEST_KEY_{language.upper()}"]
    return {"RATELIMITD_ADDRESS": live_server["RATELIMITD_TEST_ADDRESS"], "RATELIMITD_API_KEY": key}


def admitted_then_reconciled(output: str) -> bool:
    """The examples print "200 <remaining requests>" and then the report's result (1: RECONCILED);
    the organization's bucket is shared by the three examples, so the remainder is not fixed."""
    lines = output.splitlines()
    return len(lines) == 2 and re.fullmatch(r"200 \d+", lines[0]) is not None and lines[1] == "1"


def test_the_python_readme_example_works_as_pasted(live_server: dict[str, str]) -> None:
    code = readme_example("python", "python")
    output = run_suite([sys.executable, "-c", code], ROOT, readme_env(live_server, "python"))
    assert admitted_then_reconciled(output), output


def test_the_go_readme_example_works_as_pasted(live_server: dict[str, str], tmp_path: Path) -> None:
    go = require("go", "Go")
    module = CLIENTS / "go"
    (tmp_path / "main.go").write_text(readme_example("go", "go"))
    # a module of its own, as a user's would be, with the client taken from this checkout
    (tmp_path / "go.mod").write_text(
        "module example\n\ngo 1.24.0\n\nrequire github.com/ratelimitd/ratelimitd/clients/go v0.0.0\n\n"
        f"replace github.com/ratelimitd/ratelimitd/clients/go => {module}\n"
    )
    shutil.copyfile(module / "go.sum", tmp_path / "go.sum")
    output = run_suite([go, "run", "-mod=mod", "."], tmp_path, readme_env(live_server, "go"))
    assert re.fullmatch(r"200 \d+", output.splitlines()[-1]), output


def test_the_typescript_readme_example_works_as_pasted(live_server: dict[str, str]) -> None:
    node = require("node", "TypeScript")
    package = CLIENTS / "typescript"
    if not (package / "dist").exists():
        run_suite([require("npm", "TypeScript"), "run", "build"], package, {})
    # inside the package, so `import "@ratelimitd/client"` resolves to it as it would when installed
    script = package / ".readme-example.test-tmp.mjs"
    script.write_text(readme_example("typescript", "js"))
    try:
        output = run_suite([node, script.name], package, readme_env(live_server, "typescript"))
    finally:
        script.unlink()
    assert admitted_then_reconciled(output), output


def documented_refusal_statuses() -> dict[str, int]:
    """docs/api.md's refusal table: reason -> the HTTP status an LLM API answers."""
    rows = re.findall(r"^\| `(REASON_[A-Z_]+)`[^|]*\| (\d{3})\b", (ROOT / "docs/api.md").read_text(), re.MULTILINE)
    return {reason: int(status) for reason, status in rows}


def go_status(name: str) -> int:
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()  # TooManyRequests -> TOO_MANY_REQUESTS
    return int(HTTPStatus[snake])


def test_every_client_answers_each_refusal_with_the_documented_status() -> None:
    from ratelimitd_client._gen import ratelimit_pb2 as client_pb
    from ratelimitd_client.http import REFUSALS

    documented = documented_refusal_statuses()
    # every reason but UNSPECIFIED (never sent) and ALLOWED (not a refusal)
    assert len(documented) == len(client_pb.Reason.values()) - 2
    python = {client_pb.Reason.Name(reason): status for reason, (status, _) in REFUSALS.items()}
    go_source = (CLIENTS / "go/http.go").read_text()
    go = {r: go_status(s) for r, s in re.findall(r"pb\.Reason_(REASON_\w+):\s*\{http\.Status(\w+),", go_source)}
    ts_source = (CLIENTS / "typescript/src/http.ts").read_text()
    typescript = {f"REASON_{r}": int(s) for r, s in re.findall(r"\[Reason\.(\w+), \[(\d{3}),", ts_source)}
    assert python == documented
    assert go == documented
    assert typescript == documented
