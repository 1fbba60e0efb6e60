"""Writes the one protoset ghz reads: the buf image of proto/ plus Envoy's RLS descriptors.

ratelimitd's methods come from `buf build` of proto/ (the single source every client is
generated from, so nothing here can drift from the server); Envoy's ShouldRateLimit comes from
the descriptors the xds-protos package installs (it ships no .proto files).

    python load/protoset.py OUT.binpb
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent


def buf_image() -> descriptor_pb2.FileDescriptorSet:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        raise SystemExit("buf is missing: ./dev setup installs it (the buf-bin wheel)")
    built = subprocess.run(
        [buf, "build", "--as-file-descriptor-set", "-o", "-"], cwd=ROOT, capture_output=True, check=True
    )
    return descriptor_pb2.FileDescriptorSet.FromString(built.stdout)


def write_protoset(path: str | Path) -> None:
    out = buf_image()
    seen = {f.name for f in out.file}

    def add(fd: Any) -> None:
        if fd.name not in seen:
            seen.add(fd.name)
            for dep in fd.dependencies:
                add(dep)
            fd.CopyToProto(out.file.add())

    add(rls_pb2.DESCRIPTOR)
    Path(path).write_bytes(out.SerializeToString())


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="where to write the protoset (a .binpb file)")
    write_protoset(ap.parse_args().out)
