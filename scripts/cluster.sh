#!/usr/bin/env bash
# A real multi-node Flotilla cluster on one machine, in the spirit of kind:
# N Docker Engines, each in its own network namespace on a private bridge,
# joined into one swarm, with Flotilla installed by `docker stack deploy` of
# stack/flotilla.yml (agent on every node, orchestrators and API replicated,
# the real Traefik on node 1).
#
#   scripts/cluster.sh up [N]        make (or complete) an N-node cluster (3)
#   scripts/cluster.sh down          remove everything `up` made
#   scripts/cluster.sh status        nodes, engines, services, addresses
#   scripts/cluster.sh env           `export` lines: FLOTILLA_API, FLOTILLA_TOKEN...
#   scripts/cluster.sh kill-node I   power cut: SIGKILL node I's engine, its
#                                    containerd and every process of its containers
#   scripts/cluster.sh kill-engine I SIGKILL only node I's dockerd (its containers live on)
#   scripts/cluster.sh start-node I  start node I's engine again
#   scripts/cluster.sh partition I   cut node I's link to the others
#   scripts/cluster.sh heal I        restore it
#   scripts/cluster.sh restart-db    restart the control database (PostgreSQL;
#                                    with the HA data plane: the primary's container
#                                    is stopped and Swarm starts it again)
#   scripts/cluster.sh data          the data plane's members and roles (HA only)
#   scripts/cluster.sh switchover    the PostgreSQL primary hands over to its
#                                    synchronous standby (HA only)
#   scripts/cluster.sh kill-member M SIGKILL data member M (pg2, etcd3, redis1...)
#   scripts/cluster.sh docker I ...  the docker CLI against node I's engine
#   scripts/cluster.sh deploy        build and push Flotilla's images again and
#                                    update the stack (after a code change)
#   scripts/cluster.sh settled       exit 0 when no service updates, every node is
#                                    Ready and runs one agent task, none changing,
#                                    and (HA) the data plane is whole
#
# Beside the nodes, on the host: PostgreSQL, Redis and an OIDC provider
# (scripts/oidc-provider.py) listening on the host's address on the bridge,
# and an image registry (Debian's docker-registry) in the bridge's
# namespace: nodes pull Flotilla's and the demo images from it, as a real
# cluster does. Nothing listens outside this machine: the subnet exists only
# between the host and namespaces this script made. docs/cluster.md says
# what it needs and how it works.
#
# Settings (environment):
#   FLOTILLA_CLUSTER_DIR      state, logs, engines' data   (/var/tmp/flotilla-cluster)
#   FLOTILLA_CLUSTER_SUBNET   first three octets of the /24 (10.231.0)
#   FLOTILLA_CLUSTER_DOMAIN   platform domain of the apps  (cluster.test)
#   FLOTILLA_BINARY           flotillad to package (default: a static release build)
#   FLOTILLA_CLUSTER_AGENT_ENV / _ORCHESTRATOR_ENV
#                             extra `NAME=value` lines (space separated) for the
#                             agents / orchestrators, e.g. shorter heartbeats
#   FLOTILLA_CLUSTER_STORAGE  the engines' storage driver (overlay2)
#   FLOTILLA_CLUSTER_DATA     host: PostgreSQL and Redis on the host (default
#                             for a new cluster; an existing one keeps its own);
#                             ha: the stack's own data plane on nodes 1-3
#                             (etcd, Patroni, Redis Sentinel, a db-proxy on
#                             every node; scripts/build-data-image.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

STATE=${FLOTILLA_CLUSTER_DIR:-/var/tmp/flotilla-cluster}
NET=${FLOTILLA_CLUSTER_SUBNET:-10.231.0}
DOMAIN=${FLOTILLA_CLUSTER_DOMAIN:-cluster.test}
STORAGE=${FLOTILLA_CLUSTER_STORAGE:-overlay2}
HOST_IP=$NET.1
REGISTRY_IP=$NET.2
REGISTRY=$REGISTRY_IP:5000
PG_PORT=15432
REDIS_PORT=16379
OIDC_PORT=18080
API_PORT=7780
STACK=flotilla
SWITCH=flo-sw
VENV=${FLOTILLA_PYTHON_VENV:-$HOME/.cache/flotilla/venv}
USER_SUB=cluster-admin
# An existing cluster keeps its data where it is unless told otherwise.
DATA=${FLOTILLA_CLUSTER_DATA:-$(cat "$STATE/data" 2>/dev/null || echo host)}
DB_PROXY_PORT=6432
REDIS_PROXY_PORT=6380
# The stack's data plane members, zeroed when the data lives on the host.
DATA_SERVICES="etcd1 etcd2 etcd3 pg1 pg2 pg3 redis1 redis2 redis3 sentinel1 sentinel2 sentinel3 backup"

say() { echo "cluster: $*" >&2; }
fail() { echo "cluster: $*" >&2; exit 1; }
node_ns() { echo "flo-n$1"; }
node_ip() { echo "$NET.$((10 + $1))"; }
node_dir() { echo "$STATE/node$1"; }
dk() { local i=$1; shift; docker -H "unix://$(node_dir "$i")/docker.sock" "$@"; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { local pid; pid=$(cat "$1" 2>/dev/null || true); echo "$pid"; }
node_count() { cat "$STATE/nodes" 2>/dev/null || echo 0; }
engine_up() { dk "$1" version >/dev/null 2>&1; }

# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 0.2 s.
wait_for() {
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "$what: not after ${seconds}s"
    sleep 0.2
  done
}

preflight() {
  [ "$(id -u)" = 0 ] || fail "needs root (network namespaces, engines of its own)"
  local missing=()
  for command in ip nsenter unshare dockerd docker curl; do
    command -v "$command" >/dev/null || missing+=("$command")
  done
  [ ${#missing[@]} -eq 0 ] || fail "missing commands: ${missing[*]} (iproute2, util-linux, docker.io)"
  ip netns add flo-probe-$$ 2>/dev/null || fail "cannot make a network namespace here (ip netns add): this machine cannot run the cluster"
  ip netns del flo-probe-$$
  docker version >/dev/null 2>&1 || fail "the host's Docker Engine does not answer: the images are built there"
  "$root/scripts/dev-services.sh" install >/dev/null
}

# --- the network: a bridge in its own namespace, a veth per node, one to the host

setup_network() {
  local n=$1
  if ! ip netns list | grep -qw "$SWITCH"; then
    ip netns add "$SWITCH"
    ip -n "$SWITCH" link set lo up
    ip -n "$SWITCH" link add flobr0 type bridge
    ip -n "$SWITCH" link set flobr0 up
    # The registry listens on the bridge itself.
    ip -n "$SWITCH" addr add "$REGISTRY_IP/24" dev flobr0
  fi
  if ! ip link show flo-host >/dev/null 2>&1; then
    ip link add flo-host type veth peer name uplink netns "$SWITCH"
    ip -n "$SWITCH" link set uplink master flobr0 up
    ip addr add "$HOST_IP/24" dev flo-host
    ip link set flo-host up
  fi
  for i in $(seq 1 "$n"); do
    local ns; ns=$(node_ns "$i")
    ip netns list | grep -qw "$ns" && continue
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Made inside the two namespaces: the veth never appears on the host.
    ip link add "port$i" netns "$SWITCH" type veth peer name eth0 netns "$ns"
    ip -n "$SWITCH" link set "port$i" master flobr0 up
    ip -n "$ns" addr add "$(node_ip "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
}

# --- the engines

start_node() {
  local i=$1 d; d=$(node_dir "$i")
  if engine_up "$i"; then return 0; fi
  mkdir -p "$d/etc-docker" "$d/data" "$d/exec"
  # A killed engine leaves its containerd (in the old mount namespace).
  local old; old=$(pid_of "$d/exec/containerd/containerd.pid")
  if alive "$old"; then kill "$old"; wait_for 10 "node $i's old containerd to stop" bash -c "! kill -0 $old"; fi
  rm -f "$d/exec/containerd/containerd.pid"
  cat >"$d/etc-docker/daemon.json" <<EOF
{"storage-driver": "$STORAGE", "insecure-registries": ["$REGISTRY"], "log-driver": "json-file",
 "log-opts": {"max-size": "10m", "max-file": "2"}}
EOF
  # Its own network namespace, and private mount and UTS namespaces: its
  # own /etc/docker and hostname, and a /run of its own, so that the
  # containers that mount /var/run/docker.sock (the agent, Traefik) get
  # this node's engine, never the host's.
  setsid nsenter --net="/run/netns/$(node_ns "$i")" -- unshare --mount --uts --propagation slave -- sh -c "
      hostname node$i && mount --bind '$d/etc-docker' /etc/docker && mount -t tmpfs tmpfs /run &&
      exec dockerd --data-root '$d/data' --exec-root '$d/exec' --pidfile '$d/dockerd.pid' \
        -H unix:///run/docker.sock -H 'unix://$d/docker.sock' --cgroup-parent /flo-node$i" \
    >>"$d/dockerd.log" 2>&1 </dev/null &
  wait_for 60 "node $i's engine (log: $d/dockerd.log)" engine_up "$i"
  say "node $i: engine up at $(node_ip "$i")"
}

# Every process of node I, engine to containers: the node's cgroups hold
# its containers; the engine and containerd are found by their pid files.
node_processes() {
  local i=$1 d; d=$(node_dir "$i")
  pid_of "$d/dockerd.pid"
  pid_of "$d/exec/containerd/containerd.pid"
  pgrep -f -- "containerd-shim.* -address $d/" || true
  cat /sys/fs/cgroup/pids/flo-node"$i"/*/cgroup.procs 2>/dev/null || true
}

kill_node() {
  local i=$1
  [ -d "$(node_dir "$i")" ] || fail "no node $i"
  local pids; pids=$(node_processes "$i" | sort -u | tr '\n' ' ')
  # shellcheck disable=SC2086
  [ -n "${pids// }" ] && kill -9 $pids 2>/dev/null || true
  say "node $i: powered off (killed: ${pids:-nothing})"
}

kill_engine() {
  local pid; pid=$(pid_of "$(node_dir "$1")/dockerd.pid")
  alive "$pid" || fail "node $1's engine is not running"
  kill -9 "$pid"
  say "node $1: engine killed (pid $pid); its containers run on"
}

link_of() { echo "port$1"; }
link_state() { ip -n "$SWITCH" -br link show "$(link_of "$1")" 2>/dev/null | awk '{print $2}'; }

partition() {
  ip -n "$SWITCH" link set "$(link_of "$1")" down
  say "node $1: cut off"
}

heal() {
  ip -n "$SWITCH" link set "$(link_of "$1")" up
  say "node $1: link restored"
}

# --- what runs beside the nodes, on the host's address on the bridge

registry_binary() {
  local dir=$HOME/.cache/flotilla/docker-registry
  if [ ! -x "$dir/root/usr/bin/docker-registry" ]; then
    say "fetching Debian's docker-registry (unpacked, no service installed)"
    mkdir -p "$dir"
    (cd "$dir" && rm -f docker-registry_*.deb && apt-get download docker-registry >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get download docker-registry >/dev/null; }) \
      || fail "could not get Debian's docker-registry package"
    dpkg-deb -x "$dir"/docker-registry_*.deb "$dir/root"
  fi
  echo "$dir/root/usr/bin/docker-registry"
}

registry_up() { curl -sf "http://$REGISTRY/v2/" >/dev/null; }

start_registry() {
  registry_up && return 0
  local r=$STATE/registry binary; binary=$(registry_binary)
  mkdir -p "$r/data"
  printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n' \
    "$r/data" "$REGISTRY" >"$r/config.yml"
  setsid nsenter --net="/run/netns/$SWITCH" -- "$binary" serve "$r/config.yml" >"$r/registry.log" 2>&1 </dev/null &
  echo $! >"$r/registry.pid"
  wait_for 20 "the registry (log: $r/registry.log)" registry_up
  say "registry at $REGISTRY"
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1; }
pg() { runuser -u postgres -- "$@"; }
pg_up() { pg "$(pg_bin)/pg_isready" -q -h "$HOST_IP" -p "$PG_PORT"; }

start_postgres() {
  local data=$STATE/postgres
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$data" && chown postgres:postgres "$data" && chmod 700 "$data"
    local pwfile; pwfile=$(mktemp) && cat "$STATE/db-password" >"$pwfile" && chmod 644 "$pwfile"
    pg "$(pg_bin)/initdb" -D "$data" -U flotilla --pwfile="$pwfile" --auth-local=trust \
      --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '$HOST_IP'
port = $PG_PORT
unix_socket_directories = '$data'
max_connections = 200
EOF
    echo "host all all $NET.0/24 scram-sha-256" >>"$data/pg_hba.conf"
  fi
  if ! pg_up; then
    pg "$(pg_bin)/pg_ctl" -D "$data" -l "$data/postgres.log" -w -t 60 start >/dev/null
  fi
  pg "$(pg_bin)/psql" -h "$data" -p "$PG_PORT" -U flotilla -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'flotilla'" | grep -q 1 \
    || pg "$(pg_bin)/psql" -h "$data" -p "$PG_PORT" -U flotilla -d postgres -qc "CREATE DATABASE flotilla"
  say "PostgreSQL at $HOST_IP:$PG_PORT"
}

# data_members: each PostgreSQL member's role as Patroni says (HA only).
# member_container NAME: the running container of data member NAME (pg2,
# etcd3, redis1...) on its node (member N lives on node N).
member_container() {
  local i=${1##*[a-z]}
  engine_up "$i" || return 1
  dk "$i" ps -q --filter "label=com.docker.swarm.service.name=${STACK}_$1" | head -1
}

# One line per member: NAME  node N  ROLE [STATE]. PostgreSQL: Patroni's
# role and state (the primary also counts its streaming standbys); Redis:
# master or slave.
data_members() {
  local i id status
  for i in 1 2 3; do
    engine_up "$i" || { echo "pg$i  node $i  engine-down"; continue; }
    id=$(member_container "pg$i")
    [ -n "$id" ] || { echo "pg$i  node $i  no-container"; continue; }
    status=$(dk "$i" exec "$id" curl -s -m 2 localhost:8008/patroni 2>/dev/null || true)
    # The member's own state is the first "state"; its standbys' follow.
    echo "pg$i  node $i  $(grep -o '"role": *"[^"]*"' <<<"$status" | head -1 | cut -d'"' -f4) \
$(grep -o '"state": *"[^"]*"' <<<"$status" | head -1 | cut -d'"' -f4) \
$(grep -o '"state": *"streaming"' <<<"$status" | wc -l)"
  done
  for i in 1 2 3; do
    engine_up "$i" || { echo "redis$i  node $i  engine-down"; continue; }
    id=$(member_container "redis$i")
    [ -n "$id" ] || { echo "redis$i  node $i  no-container"; continue; }
    echo "redis$i  node $i  $(dk "$i" exec "$id" sh -c \
      'redis-cli --no-auth-warning -a "$(cat /run/secrets/flotilla_redis_password)" role 2>/dev/null | head -1')"
  done
}

# The data plane whole again: a PostgreSQL primary streaming to both
# standbys, every member running, one Redis master and two replicas.
data_settled() {
  [ "$(cat "$STATE/data" 2>/dev/null)" = ha ] || return 0
  local members; members=$(data_members)
  grep -Eq '^pg[0-9]  node [0-9]  (master|primary) running 2$' <<<"$members" || return 1
  [ "$(grep -Ec '^pg[0-9]  node [0-9]  replica (running|streaming)' <<<"$members")" = 2 ] || return 1
  [ "$(grep -c '^redis[0-9]  node [0-9]  master$' <<<"$members")" = 1 ] || return 1
  [ "$(grep -c '^redis[0-9]  node [0-9]  slave$' <<<"$members")" = 2 ]
}

# switchover: the PostgreSQL primary hands over to its synchronous
# standby (the only member synchronous mode lets take over; nothing
# acknowledged is lost, writes pause about a second). patronictl exits 0
# even when Patroni refuses: the new leader is checked instead.
switchover() {
  local before after id
  before=$(data_members | awk '$1 ~ /^pg/ && ($4 == "master" || $4 == "primary") {print $1}' | head -1)
  [ -n "$before" ] || fail "no PostgreSQL primary ($(data_members | tr '\n' ';'))"
  id=$(member_container "$before")
  # Asked again while Patroni finds "no good candidates": after a node's
  # loss, Swarm's DNS may still give a member's name its old task's
  # address for a while, and the leader cannot reach the candidate.
  for _ in $(seq 1 30); do
    dk "${before#pg}" exec "$id" patronictl -c /etc/patroni/patroni.yml switchover --force >/dev/null 2>&1 || true
    for _ in $(seq 1 8); do
      after=$(data_members | awk '$1 ~ /^pg/ && ($4 == "master" || $4 == "primary") {print $1}' | head -1)
      [ -n "$after" ] && [ "$after" != "$before" ] && { say "$after is the primary (was $before)"; return 0; }
      sleep 0.5
    done
  done
  fail "the primary is still ${after:-none}, not another member ($(data_members | tr '\n' ';'))"
}

# kill-member NAME: SIGKILL data member NAME's container (Swarm starts it
# again after its restart delay).
kill_member() {
  local i=${1##*[a-z]} id; id=$(member_container "$1") || fail "node $i's engine is down"
  [ -n "$id" ] || fail "no $1 container on node $i"
  dk "$i" kill "$id" >/dev/null
  say "$1 killed on node $i"
}

restart_db() {
  if [ "$(cat "$STATE/data" 2>/dev/null)" = ha ]; then
    local primary; primary=$(data_members | awk '$4 == "master" || $4 == "primary" {print $1}' | head -1)
    [ -n "$primary" ] || fail "no PostgreSQL primary to restart ($(data_members | tr '\n' ';'))"
    local i=${primary#pg}
    # Stopped, and Swarm starts its task again: never `docker restart` a
    # task's container (Swarm starts a second one beside it).
    dk "$i" stop -t 10 "$(dk "$i" ps -q --filter "label=com.docker.swarm.service.name=${STACK}_$primary" | head -1)" >/dev/null
    say "PostgreSQL primary $primary stopped on node $i; Swarm starts it again"
    return 0
  fi
  local data=$STATE/postgres
  [ -f "$data/PG_VERSION" ] || fail "no cluster database"
  pg "$(pg_bin)/pg_ctl" -D "$data" -l "$data/postgres.log" -m fast -w -t 60 restart >/dev/null
  say "PostgreSQL restarted"
}

redis_up() { redis-cli -h "$HOST_IP" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

start_redis() {
  redis_up && return 0
  mkdir -p "$STATE/redis"
  # Bound to the bridge only: nothing outside this machine reaches it.
  redis-server --bind "$HOST_IP" --port "$REDIS_PORT" --daemonize yes --dir "$STATE/redis" \
    --pidfile "$STATE/redis/redis.pid" --logfile "$STATE/redis/redis.log" --save "" --appendonly no \
    --protected-mode no >/dev/null
  wait_for 10 "Redis" redis_up
  say "Redis at $HOST_IP:$REDIS_PORT"
}

oidc_up() { curl -sf "http://$HOST_IP:$OIDC_PORT/.well-known/openid-configuration" >/dev/null; }

start_oidc() {
  if ! oidc_up; then
    setsid "$VENV/bin/python" "$root/scripts/oidc-provider.py" --host "$HOST_IP" --port "$OIDC_PORT" --token-max-age 86400 \
      >"$STATE/oidc.log" 2>&1 </dev/null &
    echo $! >"$STATE/oidc.pid"
    wait_for 30 "the OIDC provider (log: $STATE/oidc.log)" oidc_up
  fi
  # A token for the cluster's administrator, valid a day.
  local now; now=$(date +%s)
  curl -sf "http://$HOST_IP:$OIDC_PORT/_test/sign" -H 'content-type: application/json' -d "{\"claims\": {
      \"iss\": \"http://$HOST_IP:$OIDC_PORT\", \"aud\": \"flotilla\", \"sub\": \"$USER_SUB\",
      \"email\": \"$USER_SUB@$DOMAIN\", \"iat\": $now, \"exp\": $((now + 86400))}, \"header\": {}}" \
    | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p' >"$STATE/token"
  [ -s "$STATE/token" ] || fail "the OIDC provider signed no token (log: $STATE/oidc.log)"
  say "OIDC provider at http://$HOST_IP:$OIDC_PORT"
}

# --- the swarm

swarm_state() { dk "$1" info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null; }
swarm_state_settled() { case "$(swarm_state "$1")" in active|inactive) return 0 ;; *) return 1 ;; esac; }
# in_swarm I: node I belongs to a swarm. An engine restarted with its swarm
# state (after a power cut, or a session's processes killed without `down`)
# says "pending" until it reaches its managers: it must not be asked to
# init or join again ("This node is already part of a swarm").
# A node healed after a long cut can stay "pending" for minutes (Swarm
# 20.10): its engine is restarted once.
in_swarm() {
  until_or_restart "$1" 30 "its swarm membership stays pending" \
    "node $1 to settle its swarm membership (docker info: Swarm.LocalNodeState)" swarm_state_settled "$1"
  [ "$(swarm_state "$1")" = active ]
}

# until_or_restart I SECONDS WHY WHAT CHECK...: waits SECONDS for CHECK;
# if it still fails (WHY), restarts node I's engine once, which clears the
# states Swarm 20.10 gets stuck in, and waits 60 s more for WHAT.
until_or_restart() {
  local i=$1 seconds=$2 why=$3 what=$4; shift 4
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      say "node $i: $why; restarting its engine"
      kill_engine "$i" >/dev/null
      start_node "$i"
      wait_for 60 "$what" "$@"
      return 0
    fi
    sleep 0.5
  done
}
swarm_has_leader() { dk 1 node ls >/dev/null 2>&1; }
# swarm_node_ready I: the swarm (asked through a manager that answers) says
# node I is Ready.
swarm_node_ready() {
  local m
  for m in 1 2 3; do
    [ "$m" = "$1" ] && continue
    [ "$(dk "$m" node inspect "node$1" --format '{{.Status.State}}' 2>/dev/null)" = ready ] && return 0
  done
  return 1
}

# rejoin_swarm I: after node I's engine started again, waits until the swarm
# takes it as Ready. Swarm 20.10 sometimes keeps a node that lost power
# Down for good (its tasks never return); a second engine restart clears it.
rejoin_swarm() {
  [ "$(swarm_state "$1")" = active ] || return 0
  until_or_restart "$1" 45 "the swarm still has it Down" \
    "node $1 Ready in the swarm (scripts/cluster.sh status)" swarm_node_ready "$1"
}

form_swarm() {
  local n=$1
  if ! in_swarm 1; then
    # Overlay subnets from a pool that cannot meet the bridge's.
    dk 1 swarm init --advertise-addr "$(node_ip 1)" --listen-addr "$(node_ip 1):2377" \
      --default-addr-pool 10.240.0.0/16 >/dev/null
    say "swarm made on node 1"
  fi
  for i in $(seq 2 "$n"); do
    in_swarm "$i" && continue
    # Three managers keep a quorum when one is lost; the rest are workers.
    local role=worker; [ "$i" -le 3 ] && role=manager
    dk "$i" swarm join --token "$(dk 1 swarm join-token -q $role)" --advertise-addr "$(node_ip "$i")" \
      --listen-addr "$(node_ip "$i"):2377" "$(node_ip 1):2377" >/dev/null
    say "node $i joined as a $role"
  done
  # A manager that just came back (a healed link, a restarted engine) makes
  # the managers elect a leader again: nothing can be asked of the swarm
  # until one is chosen ("The swarm does not have a leader").
  wait_for 120 "the swarm to have a leader" swarm_has_leader
  for i in $(seq 1 "$n"); do
    local labels=(--label-add compute=true)
    [ "$i" = 1 ] && labels+=(--label-add edge=true)
    [ "$DATA" = ha ] && [ "$i" -le 3 ] && labels+=(--label-add "data=$i")
    dk 1 node update "${labels[@]}" "node$i" >/dev/null
  done
}

# --- images: built on the host, pushed to the cluster's registry by node 1

# push IMAGE: the host's IMAGE into the registry as $REGISTRY/IMAGE.
push() {
  local image=$1
  docker save "$image" | dk 1 load -q >/dev/null
  dk 1 tag "$image" "$REGISTRY/$image"
  dk 1 push -q "$REGISTRY/$image" >/dev/null
  say "pushed $REGISTRY/$image"
}

build_and_push() {
  local binary=${FLOTILLA_BINARY:-} args=()
  [ -n "$binary" ] && args=(--binary "$binary")
  local tag; tag=cluster-$(date +%s)
  "$root/scripts/build-flotillad-image.sh" --tag "flotilla/flotillad:$tag" "${args[@]}"
  "$root/scripts/build-traefik-image.sh" --tag flotilla/traefik:cluster
  local demos=(flotilla/demo-http:1 flotilla/demo-http:2 flotilla/demo-http:latest flotilla/demo-broken:latest)
  # Built once (scripts/test.sh builds them before the suite): not again
  # while other tests run containers of them.
  docker image inspect "${demos[@]}" >/dev/null 2>&1 || "$root/scripts/build-images.sh" >/dev/null
  push "flotilla/flotillad:$tag"
  push flotilla/traefik:cluster
  for image in "${demos[@]}"; do
    push "$image"
  done
  docker rmi "flotilla/flotillad:$tag" >/dev/null
  echo "$REGISTRY/flotilla/flotillad:$tag" >"$STATE/image"
  image_source >"$STATE/image-source"
}

# The data plane's image (HA only): built offline (cached: a second when
# nothing changed) and pushed when it differs from the one the stack runs.
data_image() {
  local image; image=$("$root/scripts/build-data-image.sh" 2>/dev/null | tail -1)
  [ -n "$image" ] || fail "scripts/build-data-image.sh failed (run it to see why)"
  [ "$REGISTRY/$image" = "$(cat "$STATE/data-image" 2>/dev/null)" ] && return 0
  push "$image"
  echo "$REGISTRY/$image" >"$STATE/data-image"
}

# What the flotillad image is made from: the given binary's digest, or the
# source tree's commit for a release build.
image_source() {
  if [ -n "${FLOTILLA_BINARY:-}" ]; then
    sha256sum "$FLOTILLA_BINARY" | cut -c1-16
  else
    echo "release-$(git -C "$root" rev-parse HEAD 2>/dev/null)$(git -C "$root" diff --quiet 2>/dev/null || echo -dirty)"
  fi
}

# --- Flotilla, by the real stack file

# environment "NAME=value ...": a service's extra variables.
environment() {
  [ -n "$1" ] || return 0
  printf '    environment:\n'
  local extra
  for extra in $1; do printf '      %s: "%s"\n' "${extra%%=*}" "${extra#*=}"; done
}

override() {
  local n=$1
  echo 'version: "3.8"'
  echo 'services:'
  [ -z "${FLOTILLA_CLUSTER_AGENT_ENV:-}" ] || { echo '  agent:'; environment "$FLOTILLA_CLUSTER_AGENT_ENV"; }
  echo '  orchestrator:'
  environment "${FLOTILLA_CLUSTER_ORCHESTRATOR_ENV:-}"
  # Not on the edge node when there are others: losing an orchestrator's
  # node keeps the edge. Its two replicas then fill the two other managers,
  # so an update stops one before starting its successor (the other leads
  # meanwhile).
  if [ "$n" -ge 3 ]; then
    echo '    deploy:'
    echo '      placement: { constraints: [node.role == manager, node.labels.edge != true] }'
    echo '      update_config: { order: stop-first }'
    echo '      rollback_config: { order: stop-first }'
  fi
  # One API replica per node, each published on its node: the host reaches
  # the API at any node's address. A node's port is free for a new task only
  # once the old one stopped: updates stop first (start-first left the new
  # task pending for good, "no suitable node (host-mode port in use)").
  cat <<EOF
  api:
    ports:
      - { target: 7800, published: $API_PORT, protocol: tcp, mode: host }
    deploy:
      replicas: $n
      update_config: { order: stop-first }
      rollback_config: { order: stop-first }
  # No images of them here.
  prometheus: { deploy: { replicas: 0 } }
  grafana: { deploy: { replicas: 0 } }
EOF
  if [ "$DATA" = host ]; then
    # The data lives beside the nodes (on the host), not in the stack.
    local service
    for service in $DATA_SERVICES; do echo "  $service: { deploy: { replicas: 0 } }"; done
    echo '  db-proxy: { deploy: { placement: { constraints: [node.labels.no-such-label == true] } } }'
  fi
}

deploy_stack() {
  local n=$1
  if ! dk 1 secret inspect flotilla_internal_token >/dev/null 2>&1; then
    local urls=()
    [ "$DATA" = host ] && urls=(
      FLOTILLA_DATABASE_URL="postgres://flotilla:$(cat "$STATE/db-password")@$HOST_IP:$PG_PORT/flotilla"
      FLOTILLA_REDIS_URL="redis://$HOST_IP:$REDIS_PORT")
    # Only the URLs above: a developer's FLOTILLA_DATABASE_URL (the
    # dev-services' loopback database) means nothing inside the cluster.
    env -u FLOTILLA_DATABASE_URL -u FLOTILLA_REDIS_URL DOCKER_HOST="unix://$(node_dir 1)/docker.sock" "${urls[@]}" \
      FLOTILLA_DB_PASSWORD="$(cat "$STATE/db-password")" FLOTILLA_REDIS_PASSWORD="$(cat "$STATE/redis-password")" \
      FLOTILLA_DB_PROXY_PORT=$DB_PROXY_PORT FLOTILLA_REDIS_PROXY_PORT=$REDIS_PROXY_PORT FLOTILLA_GRAFANA_PASSWORD=unused \
      "$root/stack/create-secrets.sh" >/dev/null
    say "secrets made"
  fi
  override "$n" >"$STATE/override.yml"
  (cd "$root/stack" && DOCKER_HOST="unix://$(node_dir 1)/docker.sock" \
    FLOTILLA_IMAGE="$(cat "$STATE/image")" TRAEFIK_IMAGE="$REGISTRY/flotilla/traefik:cluster" \
    FLOTILLA_PLATFORM_DOMAINS="$DOMAIN" FLOTILLA_OIDC_ISSUER="http://$HOST_IP:$OIDC_PORT" \
    FLOTILLA_OIDC_AUDIENCE=flotilla FLOTILLA_PLATFORM_ADMINS="$USER_SUB" \
    FLOTILLA_ACME_DIRECTORY="http://127.0.0.1:9/no-acme-in-this-cluster" \
    DATA_IMAGE="$(cat "$STATE/data-image" 2>/dev/null || echo flotilla/data:none)" FLOTILLA_BACKUP_DIR="$STATE/backups" \
    FLOTILLA_DB_PROXY_PORT=$DB_PROXY_PORT FLOTILLA_REDIS_PROXY_PORT=$REDIS_PROXY_PORT \
    docker stack deploy --with-registry-auth -c flotilla.yml -c "$STATE/override.yml" "$STACK" >"$STATE/deploy.log" 2>&1) \
    || fail "docker stack deploy failed: $(cat "$STATE/deploy.log")"
  say "stack deployed ($(cat "$STATE/image"))"
}

# No service of the stack is updating or rolling back, the agent and
# Traefik run on every node they belong on, and the orchestrators and the
# API run at least one task each. Not every API replica: after a node's
# power cut Swarm (20.10) left a host-mode task pending for good ("no
# suitable node (host-mode port already in use on 2 nodes; 1 node not
# available for new tasks)") with the node back and ready; the API
# answers on the other nodes.
stack_settled() {
  local service state replicas
  for service in agent orchestrator api traefik; do
    state=$(dk 1 service inspect "${STACK}_$service" --format '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}') || return 1
    case $state in updating | rollback_started | paused | rollback_paused) return 1 ;; esac
    replicas=$(dk 1 service ls --filter "name=${STACK}_$service" --format '{{.Replicas}}' | head -1 | cut -d' ' -f1)
    case $service in
      agent | traefik) [ -n "$replicas" ] && [ "${replicas%/*}" = "${replicas#*/}" ] || return 1 ;;
      *) [ "${replicas%/*}" -ge 1 ] 2>/dev/null || return 1 ;;
    esac
  done
}

# Every engine Ready in the swarm, one agent task running on each, and none
# on its way in or out: Swarm replaces the agent task of a node back from a
# cut or a power loss some seconds after the node is back (its old agent
# then stops), so a node that beats is not yet a node that stays put.
agents_settled() {
  local not_ready tasks running
  not_ready=$(dk 1 node ls --format '{{.Status}}' | grep -vc '^Ready$' || true)
  [ "$not_ready" = 0 ] || return 1
  tasks=$(dk 1 service ps "${STACK}_agent" --format '{{.DesiredState}} {{.CurrentState}}') || return 1
  running=$(grep -c '^Running Running' <<<"$tasks" || true)
  [ "$running" = "$(node_count)" ] || return 1
  ! grep -Eq '^(Shutdown|Running) (New|Pending|Assigned|Accepted|Preparing|Ready|Starting)|^Shutdown Running' <<<"$tasks"
}

api_url() {
  local i
  for i in $(seq 1 "$(node_count)"); do
    if curl -sf -m 1 "http://$(node_ip "$i"):$API_PORT/health" >/dev/null 2>&1; then
      echo "http://$(node_ip "$i"):$API_PORT"
      return 0
    fi
  done
  return 1
}

ready_nodes() {
  local api; api=$(api_url) || return 1
  curl -sf -m 3 "$api/flotilla.v1.NodeService/ListNodes" -H "authorization: Bearer $(cat "$STATE/token")" \
    -H 'content-type: application/json' -d '{}' | grep -o '"status": *"ready"' | wc -l
}

all_ready() { [ "$(ready_nodes 2>/dev/null || echo 0)" -ge "$1" ]; }

print_env() {
  [ -f "$STATE/token" ] || fail "no cluster here (scripts/cluster.sh up)"
  echo "export FLOTILLA_API=$(api_url || echo "http://$(node_ip 1):$API_PORT")"
  echo "export FLOTILLA_TOKEN=$(cat "$STATE/token")"
  echo "export FLOTILLA_CLUSTER_EDGE=http://$(node_ip 1):80"
  echo "export FLOTILLA_CLUSTER_DOMAIN=$DOMAIN"
  echo "export FLOTILLA_CLUSTER_REGISTRY=$REGISTRY"
  echo "export FLOTILLA_CLUSTER_NODES=$(node_count)"
  echo "export FLOTILLA_CLUSTER_ADDRESSES=$(for i in $(seq 1 "$(node_count)"); do printf '%s,' "$(node_ip "$i")"; done | sed 's/,$//')"
  echo "export FLOTILLA_CLUSTER_DIR=$STATE"
  echo "export FLOTILLA_CLUSTER_DATA=$(cat "$STATE/data" 2>/dev/null || echo host)"
  if [ "$(cat "$STATE/data" 2>/dev/null)" = ha ]; then
    echo "export FLOTILLA_CLUSTER_DATABASE_URL=postgres://flotilla:$(cat "$STATE/db-password")@$(node_ip 1):$DB_PROXY_PORT/flotilla"
  else
    echo "export FLOTILLA_CLUSTER_DATABASE_URL=postgres://flotilla:$(cat "$STATE/db-password")@$HOST_IP:$PG_PORT/flotilla"
  fi
}

up() {
  local n=${1:-$(node_count)}
  [ "$n" -gt 0 ] 2>/dev/null || n=3
  [ "$n" -le 9 ] || fail "at most 9 nodes"
  local existing; existing=$(node_count)
  [ "$existing" = 0 ] || [ "$existing" = "$n" ] || fail "a $existing-node cluster exists: scripts/cluster.sh down first"
  case $DATA in host | ha) ;; *) fail "FLOTILLA_CLUSTER_DATA is host or ha, not '$DATA'" ;; esac
  local data_before; data_before=$(cat "$STATE/data" 2>/dev/null || echo "$DATA")
  [ "$data_before" = "$DATA" ] ||
    fail "this cluster keeps its data on '$data_before': scripts/cluster.sh down first, or FLOTILLA_CLUSTER_DATA=$data_before"
  [ "$DATA" = host ] || [ "$n" -ge 3 ] || fail "FLOTILLA_CLUSTER_DATA=ha needs 3 nodes or more (one per etcd and PostgreSQL member)"
  preflight
  local started=$SECONDS
  mkdir -p "$STATE" && chmod 755 "$STATE"
  echo "$n" >"$STATE/nodes"
  echo "$DATA" >"$STATE/data"
  local secret
  for secret in db-password redis-password; do
    [ -s "$STATE/$secret" ] || (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$STATE/$secret")
  done
  setup_network "$n"
  for i in $(seq 1 "$n"); do start_node "$i"; done
  # A node left cut off (a test that stopped half-way) is linked again.
  for i in $(seq 1 "$n"); do
    [ "$(link_state "$i")" != DOWN ] || heal "$i"
  done
  start_registry
  if [ "$DATA" = host ]; then
    start_postgres
    start_redis
  else
    # Shared by the PostgreSQL members (WAL archive, base backups), as an
    # NFS mount would be between real nodes.
    mkdir -p "$STATE/backups/wal" "$STATE/backups/base"
    chmod 777 "$STATE/backups" "$STATE/backups/wal" "$STATE/backups/base"
  fi
  start_oidc
  form_swarm "$n"
  # A node the swarm still has Down (after a healed partition too) gets its
  # engine restarted once.
  for i in $(seq 1 "$n"); do rejoin_swarm "$i"; done
  # The images again only when the flotillad to package changed.
  if [ "$(image_source)" != "$(cat "$STATE/image-source" 2>/dev/null)" ] || [ ! -s "$STATE/image" ]; then
    build_and_push
  fi
  [ "$DATA" = host ] || data_image
  deploy_stack "$n"
  say "waiting for the stack's services and $n ready nodes"
  wait_for 300 "the stack's services to finish updating and run (scripts/cluster.sh status)" stack_settled
  wait_for 180 "$n nodes ready in Flotilla (scripts/cluster.sh status)" all_ready "$n"
  say "up in $((SECONDS - started)) s: $n nodes ready"
  echo
  echo "Use it from this machine:"
  echo "  eval \"\$(scripts/cluster.sh env)\"    # FLOTILLA_API, FLOTILLA_TOKEN for flo"
  echo "  flo nodes ls"
  echo "  flo deploy hello --image $REGISTRY/flotilla/demo-http:1 --port 8080 --domain hello.$DOMAIN"
  echo "  curl -H 'Host: hello.$DOMAIN' http://$(node_ip 1)/      # through Traefik on node 1"
}

status() {
  local n; n=$(node_count)
  [ "$n" -gt 0 ] || { echo "no cluster (scripts/cluster.sh up)"; return 0; }
  for i in $(seq 1 "$n"); do
    local engine=down link
    engine_up "$i" && engine=up
    link=$(link_state "$i")
    echo "node $i  $(node_ip "$i")  engine $engine  link ${link:-missing}"
  done
  registry_up && echo "registry  $REGISTRY  up" || echo "registry  $REGISTRY  down"
  if [ "$(cat "$STATE/data" 2>/dev/null)" = ha ]; then
    data_members
  else
    pg_up && echo "postgres  $HOST_IP:$PG_PORT  up" || echo "postgres  $HOST_IP:$PG_PORT  down"
    redis_up && echo "redis     $HOST_IP:$REDIS_PORT  up" || echo "redis     $HOST_IP:$REDIS_PORT  down"
  fi
  for i in $(seq 1 "$n"); do
    if engine_up "$i" && [ "$(dk "$i" info --format '{{.Swarm.ControlAvailable}}' 2>/dev/null)" = true ]; then
      dk "$i" node ls 2>/dev/null && dk "$i" service ls 2>/dev/null
      break
    fi
  done
  local api; api=$(api_url) && echo "API $api: $(ready_nodes) nodes ready" || echo "API: no replica answers"
}

down() {
  local d
  for d in "$STATE"/node*; do
    [ -d "$d" ] || continue
    local pid; pid=$(pid_of "$d/dockerd.pid")
    if alive "$pid"; then
      docker -H "unix://$d/docker.sock" swarm leave --force >/dev/null 2>&1 || true
      kill "$pid"
    fi
  done
  for d in "$STATE"/node*; do
    [ -d "$d" ] || continue
    local i=${d##*node} pid cpid
    pid=$(pid_of "$d/dockerd.pid")
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.2; done
    kill_node "$i" >/dev/null 2>&1 || true
    cpid=$(pid_of "$d/exec/containerd/containerd.pid")
    alive "$cpid" && kill -9 "$cpid"
  done
  for f in "$STATE/registry/registry.pid" "$STATE/oidc.pid" "$STATE/redis/redis.pid"; do
    local pid; pid=$(pid_of "$f")
    alive "$pid" && kill "$pid"
  done
  if [ -f "$STATE/postgres/PG_VERSION" ] && pg_up; then
    pg "$(pg_bin)/pg_ctl" -D "$STATE/postgres" -m fast -w stop >/dev/null || true
  fi
  sleep 0.5
  local ns
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^($SWITCH|flo-n[0-9]+)$" || true); do ip netns del "$ns" 2>/dev/null || true; done
  ip link del flo-host 2>/dev/null || true
  local c g
  for c in /sys/fs/cgroup/*/; do
    for g in "${c}"flo-node[0-9]*; do [ -d "$g" ] && find "$g" -depth -type d -exec rmdir {} \; 2>/dev/null; done
  done
  # Engines' mounts stay in their own namespaces; any that leaked is undone.
  { grep -o " $STATE/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$STATE"
  say "down: nothing of the cluster is left"
}

case "${1:-}" in
  up) up "${2:-}" ;;
  down) down ;;
  status) status ;;
  env) print_env ;;
  kill-node) kill_node "${2:?node number}" ;;
  kill-engine) kill_engine "${2:?node number}" ;;
  start-node) start_node "${2:?node number}"; rejoin_swarm "${2}" ;;
  partition) partition "${2:?node number}" ;;
  heal) heal "${2:?node number}" ;;
  restart-db) restart_db ;;
  data) data_members ;;
  docker) shift; i=${1:?node number}; shift; dk "$i" "$@" ;;
  deploy) build_and_push && deploy_stack "$(node_count)" ;;
  settled) stack_settled && agents_settled && data_settled ;;
  switchover) switchover ;;
  kill-member) kill_member "${2:?member: pgN, etcdN, redisN or sentinelN}" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
