#!/usr/bin/env bash
# Envoy's ShouldRateLimit (envoy.service.ratelimit.v3) under ghz, called the way Envoy calls it:
# domain "ratelimitd", one descriptor [api_key, model, tokens]. ghz reads the method from a
# protoset built from the descriptors xds-protos installs (it ships no .proto files).
# Bounded: $REQUESTS calls, and stopped after $MAX_SECONDS whatever happens; loopback only.
# (ghz 0.93 ignores -n whenever -z or -x is given, so the time bound is an outer `timeout`.)
#
#   load/ghz_envoy.sh                      # starts a server on an embedded Valkey
#   ADDRESS=127.0.0.1:50051 RATELIMITD_TOKEN=... load/ghz_envoy.sh
#
# ghz: `go install github.com/bojand/ghz/cmd/ghz@v0.93.0` (found on PATH or in $GHZ).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GHZ=${GHZ:-$(command -v ghz || echo "$(go env GOPATH 2>/dev/null)/bin/ghz")}
REQUESTS=${REQUESTS:-20000}
MAX_SECONDS=${MAX_SECONDS:-60}
CONCURRENCY=${CONCURRENCY:-64}
WORKERS=${WORKERS:-1}  # server processes, when the script starts the server
# SO_REUSEPORT spreads connections, not calls, over the workers: 4 per worker keeps them all busy.
CONNECTIONS=${CONNECTIONS:-$((4 * WORKERS))}

SERVER="" DATA="" PROTOSET=$(mktemp --suffix .protoset)
cleanup() {
  if [[ -n "$SERVER" ]]; then kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true; fi
  rm -rf "$PROTOSET" "$DATA"
}
trap cleanup EXIT

"$PY" - "$PROTOSET" <<'PY'
import sys

from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import descriptor_pb2

out, seen = descriptor_pb2.FileDescriptorSet(), set()


def add(fd):
    if fd.name not in seen:
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        fd.CopyToProto(out.file.add())


add(rls_pb2.DESCRIPTOR)
open(sys.argv[1], "wb").write(out.SerializeToString())
PY

if [[ -z "${ADDRESS:-}" ]]; then
  ADDRESS=127.0.0.1:50779
  DATA=$(mktemp -d)
  RATELIMITD_OPERATOR_TOKEN=rlt_bench RATELIMITD_LOG_LEVEL=WARNING \
    "$PY" -m ratelimitd serve --listen "$ADDRESS" --data-dir "$DATA" --workers "$WORKERS" >/dev/null &
  SERVER=$!
  export RATELIMITD_TOKEN=rlt_bench
  for _ in $(seq 100); do (exec 3<>/dev/tcp/${ADDRESS%:*}/${ADDRESS#*:}) 2>/dev/null && break; sleep 0.1; done
fi

KEY=$("$PY" load/bench.py --address "$ADDRESS" --setup-only --projects 1)
timeout "$MAX_SECONDS" "$GHZ" --insecure --protoset "$PROTOSET" \
  --call envoy.service.ratelimit.v3.RateLimitService.ShouldRateLimit \
  -d "{\"domain\":\"ratelimitd\",\"descriptors\":[{\"entries\":[
        {\"key\":\"api_key\",\"value\":\"Bearer $KEY\"},
        {\"key\":\"model\",\"value\":\"llama-3.1-8b-instant\"},
        {\"key\":\"tokens\",\"value\":\"500\"}]}]}" \
  -n "$REQUESTS" -c "$CONCURRENCY" --connections "$CONNECTIONS" \
  "$ADDRESS"
