"""Regenerates every language's code from proto/ (the single source).

Python: messages, gRPC stubs and mypy stubs go into ratelimitd/v1/, so the
generated imports (`from ratelimitd.v1 import ...`) resolve without rewriting.

    python scripts/gen_protos.py          # regenerate
    python scripts/gen_protos.py --check  # fail if the committed code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PY_PACKAGE = "ratelimitd/v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    bindir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    init = out / PY_PACKAGE / "__init__.py"
    init.write_text('"""Generated from proto/ratelimitd/v1 by scripts/gen_protos.py; do not edit."""\n')


def generated_files(root: Path) -> set[str]:
    pkg = root / PY_PACKAGE
    return {p.name for p in pkg.iterdir() if p.name.endswith(GENERATED_SUFFIXES)} | {"__init__.py"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = generated_files(out)
        if args.check:
            committed = generated_files(ROOT) if (ROOT / PY_PACKAGE).exists() else set()
            stale = sorted(
                name
                for name in fresh | committed
                if name not in fresh
                or name not in committed
                or not filecmp.cmp(out / PY_PACKAGE / name, ROOT / PY_PACKAGE / name, shallow=False)
            )
            if stale:
                print("generated code is stale, run: python scripts/gen_protos.py", file=sys.stderr)
                for name in stale:
                    print(f"  {PY_PACKAGE}/{name}", file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        target = ROOT / PY_PACKAGE
        target.mkdir(parents=True, exist_ok=True)
        for name in generated_files(ROOT) & {p.name for p in target.iterdir()}:
            (target / name).unlink()
        for name in fresh:
            shutil.copyfile(out / PY_PACKAGE / name, target / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
