"""proto/ as the single source: buf lint, language options, every language's generated code current."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.servers import ROOT

GEN = [sys.executable, str(ROOT / "scripts" / "gen_protos.py")]
LANGUAGE_OPTIONS = (
    "go_package",
    "java_package",
    "java_multiple_files",
    "java_outer_classname",
    "csharp_namespace",
    "objc_class_prefix",
    "php_namespace",
    "ruby_package",
)


def test_buf_lint_is_clean_and_the_api_compatible_with_the_last_release() -> None:
    result = subprocess.run([*GEN, "--lint"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "buf lint: clean" in result.stdout


@pytest.mark.parametrize("proto", sorted(p.name for p in (ROOT / "proto/ratelimitd/v1").glob("*.proto")))
def test_every_proto_names_where_each_languages_code_goes(proto: str) -> None:
    text = (ROOT / "proto/ratelimitd/v1" / proto).read_text()
    missing = [name for name in LANGUAGE_OPTIONS if not re.search(rf"^option {name} = ", text, re.MULTILINE)]
    assert missing == []
    assert 'option go_package = "github.com/ratelimitd/ratelimitd/clients/go/gen/ratelimitd/v1;ratelimitdv1";' in text


def test_every_languages_generated_code_is_current() -> None:
    result = subprocess.run([*GEN, "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    languages = ["python (server)", "python (client)"]
    languages += ["go"] if shutil.which("go") else []
    languages += ["typescript"] if shutil.which("npm") else []
    languages += ["openapi"]
    for language in languages:
        assert f"{language}: generated code is up to date" in result.stdout
