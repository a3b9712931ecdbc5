#!/usr/bin/env bash
# Builds the flotillad image offline, FROM scratch (no registry needed):
#
#   scripts/build-flotillad-image.sh [--tag TAG] [--binary PATH]
#
# Default: a release build of flotillad linked statically (glibc, crt-static)
# into $HOME/.cache/flotilla/static-target, plus the host's CA certificates.
# --binary packages an existing flotillad instead; a dynamically linked one
# gets the shared libraries ldd lists copied beside it (what tests use, so
# they need no second build). Prints the image id and size.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=flotilla/flotillad:latest
binary=
while [ $# -gt 0 ]; do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    *) echo "usage: $0 [--tag TAG] [--binary PATH]" >&2; exit 2 ;;
  esac
done

certs=/etc/ssl/certs/ca-certificates.crt
if [ ! -f "$certs" ]; then
  echo "build-flotillad-image: $certs is missing: apt-get install ca-certificates" >&2
  exit 1
fi

if [ -z "$binary" ]; then
  target_dir=${FLOTILLA_STATIC_TARGET_DIR:-$HOME/.cache/flotilla/static-target}
  echo "build-flotillad-image: building a static release flotillad (first time: several minutes)" >&2
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
    cargo build --release --locked -p flotilla-daemon --bin flotillad --target x86_64-unknown-linux-gnu \
    --manifest-path "$root/Cargo.toml"
  binary=$target_dir/x86_64-unknown-linux-gnu/release/flotillad
fi
[ -x "$binary" ] || { echo "build-flotillad-image: no executable at $binary" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/tmp" "$ctx/rootfs/var/lib/flotilla"
cp "$root/images/flotillad/Dockerfile" "$ctx/"
cp "$binary" "$ctx/rootfs/flotillad"
cp "$certs" "$ctx/rootfs/etc/ssl/certs/"
# A dynamically linked binary brings its libraries (and the loader).
if ldd "$binary" >/dev/null 2>&1; then
  # (ldd says "statically linked", with no path, of a static-pie binary.)
  { ldd "$binary" | grep -o '/[^ ]*' || true; } | sort -u | while read -r lib; do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
fi
if ! out=$(DOCKER_BUILDKIT=0 docker build -q -t "$tag" \
    --label "org.opencontainers.image.revision=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$ctx" 2>&1); then
  echo "$out" >&2
  exit 1
fi
size=$(docker image inspect -f '{{.Size}}' "$tag")
echo "build-flotillad-image: $tag $(docker image inspect -f '{{.Id}}' "$tag" | cut -c1-19) $((size / 1024 / 1024)) MiB" >&2
