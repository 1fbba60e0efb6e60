"""Documentation that must not drift from the code."""

from __future__ import annotations

from pathlib import Path

from ratelimitd.settings import setting_descriptions

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    missing = [name for name, _, _ in setting_descriptions() if f"`{name}`" not in text]
    assert missing == []


def test_ci_runs_the_readme_test_command() -> None:
    assert "./dev test" in (ROOT / "README.md").read_text()
    assert "./dev test" in (ROOT / ".ci" / "run").read_text()
