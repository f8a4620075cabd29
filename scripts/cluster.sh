#!/usr/bin/env bash
# Runs a three-node Parley cluster on this machine: `parley up` on
# 127.0.0.2, 127.0.0.3 and 127.0.0.4 (every service on its default ports
# there), one PostgreSQL and one nats-server of its own in a temporary
# directory, and one data directory all nodes share (./parley-cluster:
# the CA, certificates and keys every node must hold alike). Prints where
# each node listens; Ctrl-C stops everything and deletes the database.
#
#   scripts/cluster.sh                     three nodes
#   NODES=2 scripts/cluster.sh             two
#   CLUSTER_BIN=/path/parley scripts/cluster.sh   a prebuilt binary
#
# Installs what it needs first (scripts/install-deps.sh --cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${NODES:-3}
scripts/install-deps.sh --cluster
. scripts/lib/build.sh
release_bin "${CLUSTER_BIN:-}"
. scripts/lib/services.sh

tmp=$(mktemp -d /tmp/parley-cluster.XXXXXX)
data=./parley-cluster
pids=()
stop() {
  # A second Ctrl-C (or TERM) must not cut the clean-up short and leave
  # PostgreSQL or NATS running.
  trap '' INT TERM
  trap - EXIT
  echo
  echo "cluster: stopping"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  stop_services
  rm -rf "$tmp"
}
trap stop EXIT
trap 'exit 130' INT TERM

start_postgres "$tmp"
start_nats "$tmp"
# Every node's relay, so a call moves to another when its relay dies.
turn_uris=$(for i in $(seq 0 $((nodes - 1))); do printf '"turn:127.0.0.%d:3478?transport=udp", ' $((i + 2)); done)
cat > "$tmp/parley.toml" <<EOF
[ids]
database = "$PG_URL"
turn_uris = [${turn_uris%, }]

[courier]
database = "$PG_URL"

[signaling]
database = "$PG_URL"

[turn]
# Clients on this machine relay to each other through loopback.
allow_peers = ["127.0.0.0/8"]

[cluster]
nats = "$NATS_URL"
EOF

echo "cluster: PostgreSQL $PG_URL, NATS $NATS_URL"
for i in $(seq 0 $((nodes - 1))); do
  ip=127.0.0.$((i + 2))
  out="$tmp/n$i.out"
  "$bin" --data "$data" --config "$tmp/parley.toml" --admin "$ip:9090" --log warn \
    --cluster-node "n$i" up \
    --listen "$ip:3478" --tls-listen "$ip:5349" \
    --ids-listen "$ip:8444" \
    --courier-device-listen "$ip:5223" --courier-provider-listen "$ip:8443" \
    --sip-listen "$ip:5060" --sip-tls-listen "$ip:5061" --sip-wss-listen "$ip:8445" \
    --sfu-listen "$ip:5004" --sfu-api-listen "$ip:8446" \
    > "$out" 2> "$tmp/n$i.err" &
  pids+=($!)
  # The first node creates the shared data directory; the others wait.
  for _ in $(seq 300); do grep -q '^parley: ready' "$out" 2>/dev/null && break; sleep 0.1; done
  grep -q '^parley: ready' "$out" || { echo "cluster: node n$i did not start:"; cat "$tmp/n$i.err"; exit 1; }
  echo
  echo "node n$i:"
  grep '^parley: ' "$out" | grep -v '^parley: ready' | sed 's/^parley: /  /'
done

cat <<EOF

cluster: $nodes nodes ready. Shared: PostgreSQL (ids and courier state),
NATS (between couriers), $data (CA, keys, secrets). Try, in other shells:

  $bin client --state alice --ids 127.0.0.2:8444 --courier 127.0.0.2:5223,127.0.0.3:5223 \\
      --sip 127.0.0.2:5061 --ca $data/ca.pem activate --handle alice@example.com --outbox $data/outbox
  $bin client --state bob --ids 127.0.0.3:8444 --courier 127.0.0.3:5223,127.0.0.4:5223 \\
      --sip 127.0.0.3:5061 --ca $data/ca.pem activate --handle bob@example.com --outbox $data/outbox

then \`listen --answer\` as Bob and \`call bob@example.com\` as Alice, with the same
flags: the call arrives at Alice's signaling node and reaches Bob through his.
Ctrl-C stops the cluster.
EOF
wait -n "${pids[@]}" || true
echo "cluster: a node exited; see $tmp/n*.err"
