"""What a newcomer runs first: `ratelimitd demo` and `ratelimitd check`."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import pytest

from ratelimitd.app import App
from ratelimitd.cli import main
from tests.conftest import OPERATOR_TOKEN, Client
from tests.servers import ROOT


def test_demo_shows_the_worked_example_on_a_private_server() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ratelimitd", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    rows = {tuple(re.split(r"\s{2,}", line.strip())) for line in out.splitlines()}
    assert ("myapp-prod alone", "myapp-prod", "120", "80", "40", "0") in rows
    assert ("myapp-staging alone", "myapp-staging", "120", "30", "90", "0") in rows
    assert ("myapp-dev alone", "myapp-dev", "120", "100", "0", "20") in rows
    assert ("prod 80, staging 15, then dev", "myapp-dev", "20", "5", "0", "15") in rows
    assert "prod + staging admitted 100 of 110" in out


async def test_check_prints_the_decision_and_exits_3_when_refused(
    client: Client, app: App, capsys: pytest.CaptureFixture[str]
) -> None:
    org = await client.org("o", [("m", "requests", "minute", 1)])
    _, key = await client.project(org, "a")
    address = f"127.0.0.1:{app.port}"
    args = ["check", "--address", address, "--token", OPERATOR_TOKEN, "--api-key", key, "--model", "m"]
    # main() runs its own event loop: give it a thread beside the test's loop
    assert await asyncio.to_thread(main, args) == 0
    assert "ALLOWED" in capsys.readouterr().out
    assert await asyncio.to_thread(main, args) == 3
    out = capsys.readouterr().out
    assert "REFUSED (REASON_ORGANIZATION_LIMIT): an HTTP edge answers 429 rate_limit_exceeded; retry in 1m" in out
    assert "retry-after: 60" in out
    wrong = [*args[:-4], "--api-key", key[:-1] + ("x" if key[-1] != "x" else "y"), "--model", "m"]
    assert await asyncio.to_thread(main, wrong) == 3
    assert "REFUSED (REASON_INVALID_API_KEY): an HTTP edge answers 401 invalid_api_key; waiting will not help" in (
        capsys.readouterr().out
    )
