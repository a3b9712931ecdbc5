#!/usr/bin/env bash
# Builds the data plane's image offline: Debian's own PostgreSQL 15, Patroni,
# etcd, HAProxy, Redis and Redis Sentinel in one image (no registry needed:
# mmdebstrap fetches Debian's packages, `docker import` makes the base), with
# Flotilla's entry scripts from images/data on top.
#
#   scripts/build-data-image.sh [--tag TAG]
#
# Default tag: flotilla/data:<hash of the package list and the scripts> (and
# :latest). The Debian root file system is cached under
# ~/.cache/flotilla/data-image and made again only when the package list
# changes (about a minute); the scripts layer takes a second.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${FLOTILLA_CACHE:-$HOME/.cache/flotilla}/data-image
say() { echo "build-data-image: $*" >&2; }

tag=
while [ $# -gt 0 ]; do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    *) echo "usage: $0 [--tag TAG]" >&2; exit 2 ;;
  esac
done

# Patroni talks to etcd's v3 API through python3-etcd's error types;
# curl is for health checks and the entry scripts.
packages=postgresql-15,patroni,python3-etcd,etcd-server,etcd-client,haproxy,redis-server,redis-sentinel,curl,ca-certificates,tini
suite=bookworm
base_key=$(echo "$suite $packages v2" | sha256sum | cut -c1-12)
base=flotilla/data-base:$base_key

if ! docker image inspect "$base" >/dev/null 2>&1; then
  if ! command -v mmdebstrap >/dev/null; then
    say "installing mmdebstrap (Debian's package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
  fi
  mkdir -p "$cache"
  rootfs=$cache/rootfs-$base_key.tar
  if [ ! -s "$rootfs" ]; then
    say "making the Debian $suite root file system (about a minute): $packages"
    rm -f "$cache"/rootfs-*.tar
    # No documentation, manual pages or translations, and no LLVM (130 MB,
    # only for PostgreSQL's JIT, which the members run with jit off).
    mmdebstrap --quiet --format=tar --variant=apt --include="$packages" \
      --aptopt='APT::Install-Recommends "false"' \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/libLLVM*' --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/libz3*' \
      --dpkgopt='path-exclude=/usr/lib/postgresql/*/lib/bitcode/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      "$suite" "$rootfs.part"
    mv "$rootfs.part" "$rootfs"
  fi
  docker import "$rootfs" "$base" >/dev/null
  say "$base imported ($(docker image inspect -f '{{.Size}}' "$base" | awk '{printf "%.0f MB", $1/1e6}'))"
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp -r "$root/images/data/." "$ctx/"
scripts_key=$( (echo "$base"; cat "$root"/images/data/*) | sha256sum | cut -c1-12)
tag=${tag:-flotilla/data:$scripts_key}
if ! out=$(DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$base" -t "$tag" "$ctx" 2>&1); then
  echo "$out" >&2
  exit 1
fi
case $tag in
  flotilla/data:*) docker tag "$tag" flotilla/data:latest ;;
esac
say "$tag $(docker image inspect -f '{{.Id}}' "$tag" | cut -c1-19)"
echo "$tag"
