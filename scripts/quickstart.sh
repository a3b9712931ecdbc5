#!/usr/bin/env bash
# Runs Flotilla on this machine and deploys the demo app through the API.
#
#   scripts/quickstart.sh          install what is missing, build, start
#                                  `flotillad all`, deploy the demo, show it
#   scripts/quickstart.sh stop     stop flotillad (apps keep running) and the services
#   scripts/quickstart.sh down     delete every deployment, then stop
#
# Needs only a Docker Engine and this repository; PostgreSQL, Redis, protoc
# and busybox come from Debian's packages when missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}
state="$root/.flotilla"
pidfile="$state/flotillad.pid"
log="$state/flotillad.log"
api_port=${FLOTILLA_QUICKSTART_PORT:-7800}
api="http://127.0.0.1:$api_port"
app=${FLOTILLA_QUICKSTART_APP:-hello}
mkdir -p "$state"

step() { echo; echo "==> $*"; }

stop_daemon() {
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")"
    for _ in $(seq 1 100); do
      kill -0 "$(cat "$pidfile")" 2>/dev/null || break
      sleep 0.1
    done
    echo "flotillad stopped"
  fi
  rm -f "$pidfile"
}

case "${1:-}" in
  stop)
    stop_daemon
    scripts/dev-services.sh stop
    exit 0
    ;;
  down)
    bin="$CARGO_TARGET_DIR/debug"
    if [ -x "$bin/flo" ] && curl -fsS "$api/health" >/dev/null 2>&1; then
      for name in $("$bin/flo" --api "$api" ls -o json | python3 -c 'import json,sys; print(" ".join(d["name"] for d in json.load(sys.stdin)))'); do
        "$bin/flo" --api "$api" rm "$name"
      done
    fi
    stop_daemon
    scripts/dev-services.sh stop
    exit 0
    ;;
  "") ;;
  *)
    echo "usage: $0 [stop|down]" >&2
    exit 2
    ;;
esac

if ! docker info >/dev/null 2>&1; then
  echo "quickstart: the Docker Engine is not reachable; start it first" >&2
  exit 1
fi

step "PostgreSQL and Redis"
scripts/dev-services.sh start
eval "$(scripts/dev-services.sh env)"

step "images (built locally, nothing is pulled)"
scripts/build-images.sh

step "building flotillad and flo (the first build takes a few minutes)"
cargo build --locked -p flotilla-daemon -p flotilla-cli
bin="$CARGO_TARGET_DIR/debug"
flo() { "$bin/flo" --api "$api" "$@"; }

step "starting flotillad all on $api"
stop_daemon
nohup "$bin/flotillad" all \
  --database-url "$FLOTILLA_DATABASE_URL" \
  --redis-url "$FLOTILLA_REDIS_URL" \
  --listen "127.0.0.1:$api_port" \
  --insecure-dev-auth \
  --node-id-file "$state/node-id" \
  --publish-ip 127.0.0.1 \
  --advertise-address 127.0.0.1 \
  >"$log" 2>&1 &
echo $! >"$pidfile"
for _ in $(seq 1 300); do
  curl -fsS "$api/health" >/dev/null 2>&1 && break
  if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "quickstart: flotillad exited; its log:" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  sleep 0.1
done
curl -fsS "$api/health" >/dev/null || { echo "quickstart: flotillad is not healthy; see $log" >&2; exit 1; }
echo "flotillad is up (pid $(cat "$pidfile"), log $log)"

step "deploying the demo app '$app' through the API"
if flo status "$app" >/dev/null 2>&1; then
  flo rm "$app"
fi
flo deploy "$app" --image flotilla/demo-http:latest --port 8080 --domain "$app.localhost" --memory 32Mi --cpus 0.25

url=$(flo status "$app" -o json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["replicas"][0]["endpoint"])')

step "status"
flo status "$app"

step "the page at $url"
curl -fsS "$url/"
echo
echo
echo "Flotilla is running. Try:"
echo "  $bin/flo --api $api ls"
echo "  $bin/flo --api $api deploy web2 --image flotilla/demo-http:latest --port 8080"
echo "  scripts/quickstart.sh stop    # apps keep running"
echo "  scripts/quickstart.sh down    # delete every deployment, then stop"
