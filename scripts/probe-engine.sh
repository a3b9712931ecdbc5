#!/usr/bin/env bash
# Probes what the local Docker Engine allows and prints a Markdown report.
# Every object it makes is named flotilla-probe-* and removed again; a swarm it
# initialised is left again, one that was already active is left alone.
#   scripts/probe-engine.sh > docs/environment-probe.md
set -u
tag="flotilla-probe-$$"
work=$(mktemp -d)
results=()
cleanup() {
  docker service rm "$tag-global" >/dev/null 2>&1
  docker rm -f "$tag-a" "$tag-b" "$tag-priv" >/dev/null 2>&1
  sleep 1
  docker network rm "$tag-ov" >/dev/null 2>&1
  docker rmi -f "$tag/scratch" "$tag/imported" >/dev/null 2>&1
  [ "${swarm_started:-0}" = 1 ] && docker swarm leave --force >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
record() { results+=("| $1 | $2 | $3 |"); echo "probe: $1: $2" >&2; }

busybox=$(command -v busybox || echo /bin/busybox)
if [ ! -x "$busybox" ] || ! file "$busybox" 2>/dev/null | grep -q static; then
  [ -x /bin/busybox ] && busybox=/bin/busybox
fi
cp "$busybox" "$work/busybox"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT ["/bin/busybox","httpd","-f","-p","8080","-h","/"]\n' >"$work/Dockerfile"

server=$(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})' 2>&1)
info=$(docker info --format 'storage={{.Driver}} cgroup-driver={{.CgroupDriver}} cgroup-version={{.CgroupVersion}} cpus={{.NCPU}} mem={{.MemTotal}}' 2>&1)

if out=$(DOCKER_BUILDKIT=0 docker build -q -t "$tag/scratch" "$work" 2>&1); then
  record "docker build FROM scratch" yes "legacy builder; image $(docker image inspect -f '{{.Size}}' "$tag/scratch") bytes"
else
  record "docker build FROM scratch" no "$(echo "$out" | tail -1)"
fi

tar -C "$work" -cf "$work/rootfs.tar" busybox
if docker import -c 'ENTRYPOINT ["/busybox","true"]' "$work/rootfs.tar" "$tag/imported" >/dev/null 2>&1 &&
  docker run --rm "$tag/imported" >/dev/null 2>&1; then
  record "docker import of a rootfs tarball" yes "imported image runs"
else
  record "docker import of a rootfs tarball" no "import or run failed"
fi

if docker run -d --name "$tag-a" -p 127.0.0.1::8080 "$tag/scratch" >/dev/null 2>&1; then
  port=$(docker port "$tag-a" 8080/tcp | head -1 | sed 's/.*://')
  sleep 0.5
  if code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$port/bin/busybox") && [ "$code" = 200 ]; then
    record "published host port on loopback" yes "HTTP 200 through docker-proxy"
  else
    record "published host port on loopback" no "HTTP $code"
  fi
  cid=$(docker inspect -f '{{.Id}}' "$tag-a")
  v2="/sys/fs/cgroup/system.slice/docker-$cid.scope"
  v1="/sys/fs/cgroup/memory/docker/$cid"
  unified="/sys/fs/cgroup/unified/docker/$cid"
  if [ -r "$v2/memory.current" ]; then
    record "container cgroup visible from host" "yes (v2)" "$v2"
  elif [ -r "$v1/memory.usage_in_bytes" ]; then
    extra=""
    [ -d "$unified" ] && extra="; the hybrid unified hierarchy has $unified (no controllers)"
    record "container cgroup visible from host" "yes (v1)" "$v1 (memory), /sys/fs/cgroup/cpuacct/docker/<id>, blkio, pids$extra"
  else
    record "container cgroup visible from host" no "neither $v2 nor $v1"
  fi
else
  record "published host port on loopback" no "container did not start"
fi

if out=$(docker run -d --name "$tag-priv" --privileged "$tag/scratch" 2>&1); then
  record "privileged container" yes "started"
else
  record "privileged container" no "$(echo "$out" | grep -o 'unable to apply caps[^:]*: [^:]*' | head -1)"
fi

state=$(docker info --format '{{.Swarm.LocalNodeState}}')
if [ "$state" = active ]; then
  record "docker swarm init" "already active" "left as it was"
elif out=$(timeout 60 docker swarm init --advertise-addr 127.0.0.1 2>&1); then
  swarm_started=1
  record "docker swarm init" yes "single-node manager on 127.0.0.1"
else
  record "docker swarm init" no "$(echo "$out" | tail -1)"
fi

if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" = active ]; then
  if timeout 60 docker network create -d overlay --attachable "$tag-ov" >/dev/null 2>&1; then
    record "overlay network (attachable)" yes "created"
    docker run -d --name "$tag-b" --network "$tag-ov" "$tag/scratch" >/dev/null 2>&1
    sleep 1
    # busybox nc, not wget: this busybox's wget crashed on the overlay here.
    if docker run --rm --network "$tag-ov" --entrypoint /bin/busybox "$tag/scratch" sh -c \
      "printf 'GET /bin/busybox HTTP/1.0\r\n\r\n' | nc -w 5 $tag-b 8080 | head -1" 2>/dev/null | grep -q ' 200 '; then
      record "container to container over the overlay" yes "by name, same node"
    else
      record "container to container over the overlay" no "wget by name failed"
    fi
  else
    record "overlay network (attachable)" no "create failed"
  fi
  if timeout 90 docker service create -d --name "$tag-global" --mode global \
    --publish mode=host,published=18089,target=8080 "$tag/scratch" >/dev/null 2>&1; then
    ok=no
    for _ in $(seq 1 30); do
      if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:18089/bin/busybox)" = 200 ]; then ok=yes; break; fi
      sleep 1
    done
    record "global service, host-mode published port" "$ok" "task of a locally built image (no registry digest)"
    docker service update -d --publish-rm 18089 --publish-add published=18090,target=8080 "$tag-global" >/dev/null 2>&1
    ok=no
    for _ in $(seq 1 20); do
      if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:18090/bin/busybox)" = 200 ]; then ok=yes; break; fi
      sleep 1
    done
    detail="ingress-mode published port"
    [ -e /proc/sys/net/ipv4/vs ] || detail="$detail; the kernel has no IPVS (/proc/sys/net/ipv4/vs missing)"
    record "swarm routing mesh (ingress)" "$ok" "$detail"
  else
    record "global service, host-mode published port" no "service create failed"
  fi
fi

echo "# Docker Engine probe"
echo
echo "Run on $(date -u +%Y-%m-%d) by \`scripts/probe-engine.sh\`."
echo
echo "- engine: $server"
echo "- $info"
echo "- kernel: $(uname -r)"
echo
echo "| capability | works | detail |"
echo "|---|---|---|"
printf '%s\n' "${results[@]}"
