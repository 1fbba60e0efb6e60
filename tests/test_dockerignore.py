"""The Docker build context: what the Dockerfile copies goes in, and nothing else."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.servers import ROOT


def _regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker matches it (Go's filepath.Match, plus ``**``)."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def in_context(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for rule in rules:
        negated = rule.startswith("!")
        regex = _regex(rule.removeprefix("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            included = negated
    return included


def copied_by_the_dockerfile() -> list[str]:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += [s.rstrip("/") for s in line.split()[1:-1] if not s.startswith("--")]
    return sources


def test_what_the_dockerfile_copies_is_in_the_context_and_nothing_else() -> None:
    copied = copied_by_the_dockerfile()
    assert copied == ["pyproject.toml", "README.md", "ratelimitd"]
    for path in [*copied, "ratelimitd/app.py", "ratelimitd/engine/lua/decide.lua", "ratelimitd/v1/ratelimit_pb2.pyi"]:
        assert in_context(path), path
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "clients/typescript/node_modules/x/index.js",
        "tests/test_server.py",
        "load/bench.py",
        "ratelimitd/__pycache__/app.cpython-311.pyc",
        "ratelimitd/engine/__pycache__/keys.cpython-311.pyc",
        "ratelimitd.egg-info/PKG-INFO",
        "data/appendonly.aof",
    ]:
        assert not in_context(path), path
    # every file the package ships is really there: the allow-list names no path that moved
    assert all((ROOT / p).exists() for p in copied)


def test_the_context_is_small() -> None:
    """Sum of the files that go in: the package, not a virtualenv (the 300 MB of issue 14).
    A directory left out is not walked: no rule here brings a file back from one."""
    size = 0
    for folder, dirs, files in os.walk(ROOT):
        where = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if in_context(str(where / d))]
        size += sum((Path(folder) / f).stat().st_size for f in files if in_context(str(where / f)))
    assert 10_000 < size < 5 * 1024 * 1024, size
