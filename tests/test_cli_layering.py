"""The CLI package's shape: nothing below it imports it, its modules import each other without a
cycle (imports inside functions count), and none grows past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.servers import ROOT

PACKAGE = ROOT / "ratelimitd"
CLI = "ratelimitd.cli"
MAX_LINES = 400


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imported(path: Path) -> set[str]:
    """Every ratelimitd module ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("ratelimitd")}


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "v1" not in p.relative_to(PACKAGE).parts}


def test_nothing_but_the_entry_point_imports_the_cli() -> None:
    wrong = {
        name: sorted(i for i in imported(path) if i == CLI or i.startswith(CLI + "."))
        for name, path in sources().items()
        if not name.startswith(CLI) and name != "ratelimitd.__main__"
    }
    assert {name: found for name, found in wrong.items() if found} == {}


def cli_graph() -> dict[str, set[str]]:
    modules = {name: path for name, path in sources().items() if name.startswith(CLI + ".")}
    return {name: {i for i in imported(path) if i in modules and i != name} for name, path in modules.items()}


def test_cli_modules_import_each_other_without_a_cycle() -> None:
    graph = cli_graph()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
    # the package's __init__ re-exports main(): a module importing the package itself would close a loop
    assert not [name for name, path in sources().items() if name.startswith(CLI + ".") and CLI in imported(path)]


def test_the_cycle_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ratelimitd.cli.main import main\n")
    assert "ratelimitd.cli.main" in imported(source)


def test_no_cli_module_is_over_400_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "cli").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
