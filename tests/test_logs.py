"""--log-format json: one event per line with a stable schema, no secret, repeated errors held back."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from ratelimitd.core.logs import CONTEXT_FIELDS, JsonFormatter, RepeatFilter, TextFormatter
from ratelimitd.v1 import rate_limit_service_pb2_grpc
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.servers import ROOT, RatelimitdProcess, free_port

ORG = "org_" + "b" * 12
API_KEY = "rlk_" + "a" * 12 + "b" * 12 + "s3cr3t" * 5 + "zz"  # well-formed: decided in storage, which is down
OPERATOR = "rlt_operator-secret-for-the-log-test"


def events(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_json_logs_are_one_event_a_line_with_context_no_secret_and_repeats_held_back(tmp_path: Path) -> None:
    # storage that never answers: every decision fails the same way, the flood a log must survive
    down = f"redis://127.0.0.1:{free_port()}/0"
    server = RatelimitdProcess(
        "--redis-url", down, "--log-format", "json", env={"RATELIMITD_OPERATOR_TOKEN": OPERATOR}, log=tmp_path / "log"
    )
    server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = rate_limit_service_pb2_grpc.RateLimitServiceStub(channel)
            for i in range(20):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    request = pb.CheckRequest(api_key=API_KEY, model="m", request_id=f"req-{i}")
                    await stub.CheckAndConsume(request, timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
    output = server.output()
    logged = events(output)  # every line, stdout's and stderr's, is one JSON object
    for event in logged:
        assert {"time", "level", "event", "logger"} <= set(event), event
        assert set(event) <= {"time", "level", "event", "logger", "org", "project", "request_id", "repeated", "error"}
    assert any(str(e["event"]).startswith("ratelimitd 0.1.0 listening on ") for e in logged)
    assert any(e["level"] == "warning" and str(e["event"]).startswith("storage is unreachable") for e in logged)
    failures = [e for e in logged if str(e["event"]).startswith("CheckAndConsume: ")]
    # twenty calls failed alike; the first is written, the rest held back for the interval
    assert len(failures) == 1, failures
    assert (failures[0]["org"], failures[0]["request_id"], failures[0]["level"]) == (ORG, "req-0", "warning")
    assert API_KEY not in output and "s3cr3t" not in output and OPERATOR not in output
    assert any(e["event"] == "shutting down (a second signal ends the drain early)" for e in logged)


def test_an_unknown_log_format_is_refused(tmp_path: Path) -> None:
    server = RatelimitdProcess("--log-format", "xml", log=tmp_path / "log")
    with pytest.raises(RuntimeError, match="invalid choice: 'xml'"):
        server.start()


def record(msg: str, *args: object, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("ratelimitd.x", level, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


def test_a_repeated_warning_is_written_once_per_interval_then_with_its_count() -> None:
    now = [100.0]
    repeats = RepeatFilter(60, clock=lambda: now[0])
    assert repeats.filter(record("storage: %s", "timeout"))
    assert [repeats.filter(record("storage: %s", f"timeout {i}")) for i in range(5)] == [False] * 5
    assert repeats.filter(record("another problem"))  # another template is its own
    assert repeats.filter(record("info %s", 1, level=logging.INFO))  # below WARNING: never held back
    assert repeats.filter(record("info %s", 1, level=logging.INFO))
    now[0] += 60
    after = record("storage: %s", "timeout")
    assert repeats.filter(after)
    assert getattr(after, "repeated", 0) == 5
    assert '"repeated": 5' in JsonFormatter().format(after)
    assert TextFormatter().format(after).endswith("storage: timeout (and 5 more like it held back)")


def test_an_interval_of_zero_holds_nothing_back() -> None:
    repeats = RepeatFilter(0)
    assert all(repeats.filter(record("same")) for _ in range(3))


def test_nothing_shaped_like_a_secret_is_written_in_either_format() -> None:
    r = record("refused %s for %s", API_KEY, OPERATOR, org=ORG, request_id="r1", project="", password="pw")
    line = json.loads(JsonFormatter().format(r))
    assert line["event"] == "refused rlk_… for rlt_…"
    assert (line["org"], line["request_id"]) == (ORG, "r1")
    assert "project" not in line and "password" not in line  # empty context is left out; other extras never
    assert API_KEY not in TextFormatter().format(r) and OPERATOR not in TextFormatter().format(r)


def test_the_log_schema_in_operations_md_is_the_one_written() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    logs = text[text.index("\n## Logs\n") : text.index("\n## Metrics\n")]
    example = json.loads(logs.split("```json\n", 1)[1].split("```", 1)[0])
    documented = set()
    for line in logs.splitlines():
        if line.startswith("| `") and "|" in line[2:]:
            documented |= {f.strip("`") for f in line.split("|")[1].strip().split(", ")}
    documented -= {name for name in documented if name.startswith("RATELIMITD_")}
    assert documented == {"time", "level", "event", "logger", *CONTEXT_FIELDS, "repeated", "error"}
    assert set(example) <= documented and {"time", "level", "event", "logger"} <= set(example)
    r = record("CheckAndConsume: %s", "down", org=example["org"], request_id=example["request_id"])
    assert set(json.loads(JsonFormatter().format(r))) == set(example)


def test_every_command_holds_back_repeated_warnings(tmp_path: Path) -> None:
    """Not only serve: demo's private server and the admin verbs log through the same handler."""
    script = (
        "import logging\n"
        "from ratelimitd.cli import main\n"
        "main(['config', 'show'])\n"
        "for i in range(5):\n"
        "    logging.getLogger('ratelimitd.x').warning('storage failed: %s', i)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RATELIMITD_")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
    )
    assert done.stderr.splitlines()[-1].endswith("WARNING ratelimitd.x: storage failed: 0"), done.stderr
    assert done.stderr.count("storage failed") == 1, done.stderr
