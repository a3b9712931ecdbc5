#!/usr/bin/env bash
# Creates the Docker secrets stack/flotilla.yml uses, with generated values:
#
#   stack/create-secrets.sh [--suffix SUFFIX]
#
#   flotilla_postgres_password  PostgreSQL's superuser (postgres) password
#   flotilla_replication_password  the standbys' replication password
#   flotilla_db_password        the flotilla role's password, or $FLOTILLA_DB_PASSWORD
#   flotilla_redis_password     Redis' password (members, sentinels, clients),
#                               or $FLOTILLA_REDIS_PASSWORD (letters and digits)
#   flotilla_database_url       the stack's PostgreSQL primary through the
#                               node's db-proxy, or $FLOTILLA_DATABASE_URL for
#                               one outside the stack
#   flotilla_redis_url          the stack's Redis master through db-proxy, or
#                               $FLOTILLA_REDIS_URL
#   flotilla_grafana_password   Grafana's admin password (printed once), or
#                               $FLOTILLA_GRAFANA_PASSWORD
#   flotilla_certificate_key    seals the keys of certificates Flotilla orders
#   flotilla_internal_token     what flotillad services and Traefik show each other
#   flotilla_traefik_static     traefik/traefik.toml with that token
#                               (stack/traefik-secret.sh)
#
# Swarm secrets cannot be changed: if any of them exists, nothing is created
# (remove them first, or rotate under new names). --suffix appends SUFFIX to
# every name (several stacks on one swarm; tests). Run on a manager.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
suffix=
while [ $# -gt 0 ]; do
  case $1 in
    --suffix) suffix=$2; shift 2 ;;
    *) echo "usage: $0 [--suffix SUFFIX]" >&2; exit 2 ;;
  esac
done

names=(flotilla_postgres_password flotilla_replication_password flotilla_db_password flotilla_redis_password
  flotilla_database_url flotilla_redis_url flotilla_grafana_password
  flotilla_certificate_key flotilla_internal_token flotilla_traefik_static)
existing=()
for name in "${names[@]}"; do
  if docker secret inspect "$name$suffix" >/dev/null 2>&1; then
    existing+=("$name$suffix")
  fi
done
if [ ${#existing[@]} -gt 0 ]; then
  echo "create-secrets: these secrets exist already, nothing was created: ${existing[*]}" >&2
  echo "create-secrets: remove them (docker secret rm ...) or choose another --suffix" >&2
  exit 1
fi

random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
create() { # NAME VALUE: the value goes through stdin, never the command line
  printf '%s' "$2" | docker secret create "$1$suffix" - >/dev/null
  echo "created $1$suffix"
}

# The token also goes into Traefik's configuration; a private file for the
# renderer, removed however this script ends.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
chmod 700 "$scratch"

create flotilla_postgres_password "$(random_hex 24)"
create flotilla_replication_password "$(random_hex 24)"
password=${FLOTILLA_DB_PASSWORD:-$(random_hex 24)}
create flotilla_db_password "$password"
redis_password=${FLOTILLA_REDIS_PASSWORD:-$(random_hex 24)}
create flotilla_redis_password "$redis_password"
# db-proxy is each node's own HAProxy (stack/flotilla.yml): the ports are
# the ones it publishes.
create flotilla_database_url \
  "${FLOTILLA_DATABASE_URL:-postgres://flotilla:$password@db-proxy:${FLOTILLA_DB_PROXY_PORT:-6432}/flotilla}"
create flotilla_redis_url "${FLOTILLA_REDIS_URL:-redis://:$redis_password@db-proxy:${FLOTILLA_REDIS_PROXY_PORT:-6380}}"
grafana=${FLOTILLA_GRAFANA_PASSWORD:-$(random_hex 12)}
create flotilla_grafana_password "$grafana"
create flotilla_certificate_key "$(random_hex 32)"
random_hex 32 > "$scratch/internal-token"
create flotilla_internal_token "$(cat "$scratch/internal-token")"
create flotilla_traefik_static "$("$here/traefik-secret.sh" "$scratch/internal-token" --print)"

if [ -z "${FLOTILLA_GRAFANA_PASSWORD:-}" ]; then
  echo
  echo "Grafana: user admin, password $grafana (shown only now)"
fi
