#!/usr/bin/env bash
# The Dockerfile's steps without Docker: install the package (not editable, no
# dev extras) into a fresh virtualenv, run `ratelimitd serve` as an unprivileged
# user with the image's environment, and ask the health check the image uses.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
chmod 755 "$work"
stop() {
  if [[ -n "${server:-}" ]]; then
    pkill -TERM -P "$server" 2>/dev/null || true
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap stop EXIT

"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet . >/dev/null
mkdir "$work/data"

port=$("$work/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_user=()
# As in the image, not as root -- where this machine's Python is readable by
# an unprivileged user at all (a Python installed under /root is not).
if [[ $(id -u) == 0 ]] && command -v runuser >/dev/null &&
  runuser -u nobody -- "$work/venv/bin/python" -c pass 2>/dev/null; then
  chown nobody "$work/data"
  as_user=(runuser -u nobody --)
fi
# exec: $server is the server itself (or runuser, whose child gets its SIGTERM)
(cd "$work/data" && exec env RATELIMITD_LISTEN="127.0.0.1:$port" RATELIMITD_DATA_DIR="$work/data" PYTHONUNBUFFERED=1 \
  "${as_user[@]}" "$work/venv/bin/ratelimitd" serve >"$work/serve.log" 2>&1) &
server=$!

for _ in $(seq 200); do
  if "$work/venv/bin/ratelimitd" health --address "127.0.0.1:$port" --timeout 1 >/dev/null 2>&1; then
    echo "image smoke: installed package serves and reports SERVING on 127.0.0.1:$port (as ${as_user[2]:-$(id -un)})"
    exit 0
  fi
  sleep 0.1
done
echo "image smoke: server never became healthy" >&2
cat "$work/serve.log" >&2
exit 1
