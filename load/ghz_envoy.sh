#!/usr/bin/env bash
# Envoy's ShouldRateLimit (envoy.service.ratelimit.v3) under ghz, called the way Envoy calls it:
# domain "ratelimitd", one descriptor [api_key, model, tokens]. ghz reads the method from the
# protoset load/protoset.py writes: the buf image of proto/ plus Envoy's RLS descriptors from
# xds-protos (it ships no .proto files), so no .proto file is copied here.
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

"$PY" load/protoset.py "$PROTOSET"

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
