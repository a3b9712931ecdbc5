#!/usr/bin/env bash
# Makes the flotilla_traefik_static Docker secret: traefik/traefik.toml with
# the cluster's internal token in the route table request's header, so
# Traefik receives the certificates Flotilla orders (and nobody else does).
#
#   stack/traefik-secret.sh <internal-token-file> [--print]
#
# --print writes the result to stdout instead of creating the secret.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
token_file=${1:?usage: stack/traefik-secret.sh <internal-token-file> [--print]}
token=$(tr -d '\n' < "$token_file")
if [ -z "$token" ] || [[ "$token" == *[!A-Za-z0-9_.~+/=-]* ]]; then
  echo "the internal token in $token_file must be non-empty base64/url-safe text" >&2
  exit 2
fi
rendered=$(sed "s|Bearer FLOTILLA_INTERNAL_TOKEN|Bearer ${token}|" "$here/../traefik/traefik.toml")
if [ "${2:-}" = "--print" ]; then
  printf '%s\n' "$rendered"
else
  printf '%s\n' "$rendered" | docker secret create flotilla_traefik_static - >/dev/null
  echo "created the Docker secret flotilla_traefik_static"
fi
