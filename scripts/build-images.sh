#!/usr/bin/env bash
# Builds the images Flotilla's quickstart and tests need, from scratch and with
# no registry (nothing can be pulled here):
#   flotilla/demo-http:1 (also :latest)  busybox httpd serving a page naming its deployment
#   flotilla/demo-http:2                 the same, saying version 2 (for updates)
#   flotilla/demo-broken:latest          starts, never listens (for rollbacks)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

busybox=/bin/busybox
if ! dpkg -s busybox-static >/dev/null 2>&1; then
  echo "build-images: busybox-static is not installed; run scripts/dev-services.sh install" >&2
  exit 1
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

# build TAG DIR [docker build args...]: the classic builder, since BuildKit may
# be missing and FROM scratch needs nothing else.
build() {
  local tag=$1 dir=$2
  shift 2
  rm -rf "${ctx:?}"/*
  cp "$busybox" "$ctx/busybox"
  cp "$root/images/$dir"/* "$ctx/"
  if ! out=$(DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$@" "$ctx" 2>&1); then
    echo "$out" >&2
    exit 1
  fi
  echo "build-images: $tag $(docker image inspect -f '{{.Id}}' "$tag" | cut -c1-19)" >&2
}

build flotilla/demo-http:1 demo-http --build-arg VERSION=1
docker tag flotilla/demo-http:1 flotilla/demo-http:latest
build flotilla/demo-http:2 demo-http --build-arg VERSION=2
build flotilla/demo-broken:latest demo-broken
