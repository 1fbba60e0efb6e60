"""Imports point down the layers, and no module imports itself round a circle.

Every import counts, those inside functions too: a deferred import still ties the
modules together. docs/architecture.md draws the same map.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import ratelimitd

PACKAGE = Path(ratelimitd.__file__).parent
# What each layer may import (besides itself). The rest of the package (app.py, workers.py,
# the CLI, tls.py) wires the layers together and may import any of them.
MAY_IMPORT = {
    "core": set(),  # shared by all, depends on none
    "storage": {"core"},
    "engine": {"core", "storage"},
    "api": {"core", "engine", "v1"},
    "http": {"core", "v1"},  # JSON over HTTP: forwards to the gRPC server, decides nothing
    # The web console: an adapter like http, on top of it (its RPCs go through http's gateway
    # to the gRPC server's gate); it signs in itself, so it also reaches the engine's
    # credentials and sessions, and api's error-to-status table for the sign-in's answers.
    "console": {"core", "engine", "api", "http"},
    "settings": {"core"},
    "v1": set(),  # generated from proto/
}
# The command sits above everything: only the entry point may import it.
CLI = "ratelimitd.cli"
ENTRY_POINT = "ratelimitd.__main__"
# Past this a module holds more than one thing (issue 11); generated code (v1/) is exempt.
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> Iterator[str]:
    """The package's modules ``path`` imports, anywhere in it (``from pkg import submodule``
    counts as the submodule)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "ratelimitd")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ratelimitd":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield sub if sub in known else node.module


def layer(module: str) -> str:
    if module == "ratelimitd":  # the package itself holds only __version__
        return "core"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else "wiring"


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: {m for m in imported(path, known) if m in known and m != name} for name, path in found.items()}


def test_imports_point_down_the_layers() -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in graph().items()
        if layer(name) != "wiring"
        for target in targets
        if layer(target) != layer(name) and layer(target) not in MAY_IMPORT[layer(name)]
    )
    assert wrong == []


def test_the_layer_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f() -> None:\n    from ratelimitd.engine import ids\n    import ratelimitd.api.gate\n")
    known = {"ratelimitd.engine.ids", "ratelimitd.engine", "ratelimitd.api.gate"}
    assert set(imported(source, known)) == {"ratelimitd.engine.ids", "ratelimitd.api.gate"}


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert [sorted(c) for c in cycles(graph())] == []


def test_nothing_but_the_entry_point_imports_the_cli() -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in graph().items()
        if not (name == CLI or name.startswith(CLI + ".")) and name != ENTRY_POINT
        for target in targets
        if target == CLI or target.startswith(CLI + ".")
    )
    assert wrong == []


def test_no_module_is_over_400_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items() if layer(name) != "v1"}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_the_cycle_check_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
