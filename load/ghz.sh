#!/usr/bin/env bash
# CheckAndConsume under ghz (a Go load generator, lighter than a Python client).
# Bounded: at most $REQUESTS calls and $MAX_SECONDS seconds, on loopback only.
# (ghz 0.93 ignores -n whenever -z is given, so the time bound is an outer `timeout`.)
#
#   load/ghz.sh                      # starts a server on an embedded Valkey
#   ADDRESS=127.0.0.1:50051 RATELIMITD_TOKEN=... load/ghz.sh
#
# ghz: `go install github.com/bojand/ghz/cmd/ghz@v0.93.0` (found on PATH or in $GHZ).
# The method comes from the buf image of proto/ (load/protoset.py runs `buf build`), the same
# source every client is generated from: no copy of a .proto file here can drift from the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GHZ=${GHZ:-$(command -v ghz || echo "$(go env GOPATH 2>/dev/null)/bin/ghz")}
REQUESTS=${REQUESTS:-50000}
MAX_SECONDS=${MAX_SECONDS:-60}
CONCURRENCY=${CONCURRENCY:-64}
WORKERS=${WORKERS:-1}  # server processes, when the script starts the server
# SO_REUSEPORT spreads connections, not calls, over the workers: 4 per worker keeps them all busy.
CONNECTIONS=${CONNECTIONS:-$((4 * WORKERS))}

SERVER="" DATA="" PROTOSET=$(mktemp --suffix .binpb)
cleanup() {
  if [[ -n "$SERVER" ]]; then kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true; fi
  rm -rf "$PROTOSET" "$DATA"
}
trap cleanup EXIT
"$PY" load/protoset.py "$PROTOSET"

if [[ -z "${ADDRESS:-}" ]]; then
  ADDRESS=127.0.0.1:50778
  DATA=$(mktemp -d)
  RATELIMITD_OPERATOR_TOKEN=rlt_bench RATELIMITD_LOG_LEVEL=WARNING \
    "$PY" -m ratelimitd serve --listen "$ADDRESS" --data-dir "$DATA" --workers "${WORKERS:-1}" >/dev/null &
  SERVER=$!
  export RATELIMITD_TOKEN=rlt_bench
  for _ in $(seq 100); do (exec 3<>/dev/tcp/${ADDRESS%:*}/${ADDRESS#*:}) 2>/dev/null && break; sleep 0.1; done
fi

KEY=$("$PY" load/bench.py --address "$ADDRESS" --setup-only --projects 1)
timeout "$MAX_SECONDS" "$GHZ" --insecure \
  --protoset "$PROTOSET" \
  --call ratelimitd.v1.RateLimitService.CheckAndConsume \
  -d "{\"api_key\":\"$KEY\",\"model\":\"llama-3.1-8b-instant\",\"tokens\":500}" \
  -n "$REQUESTS" -c "$CONCURRENCY" --connections "$CONNECTIONS" \
  "$ADDRESS"
