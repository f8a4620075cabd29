#!/usr/bin/env bash
# A three-node courier cluster on this machine: `parley courier` (release)
# on 127.0.0.2, .3 and .4 with one PostgreSQL and one nats-server of its
# own (scripts/lib/services.sh). `parley loadsim courier` spreads DEVICES
# devices over the three nodes and pushes over provider connections
# spread over them too, so two pushes in three reach a node that does not
# hold the device's queue and two devices in three sit on a node that
# does not: phase 1 offers RATE pushes/s (throughput), phase 2 half of
# what phase 1 achieved (provider → device latency across nodes), phase 3
# half load again while one node is killed with SIGKILL: providers retry
# refused pushes with the same id at the other nodes, its devices
# reconnect to them, and loadsim reports how long until every
# acknowledged push was delivered, and any lost or delivered twice. Then calls: three `parley
# signaling` nodes on the same PostgreSQL and NATS, a SIPp callee
# registered at the second, and SIPp callers at CALL_RATES calls/s, first
# through the first node (the call crosses to the callee's edge node),
# then through the callee's own node, for the call set-up time (INVITE to
# 200) across nodes and on one. Everything shares the 2 cores.
#
#   bench/cluster.sh                              10,000 devices, 20,000/s offered
#   DEVICES=3000 RATE=5000 bench/cluster.sh       quick
#   CALL_RATES="200 500" STEP_SECS=5 bench/cluster.sh
#   BENCH_BIN=/tmp/parley bench/cluster.sh        a prebuilt binary
#
# Needs openssl, postgresql, nats-server and sipp (scripts/install-deps.sh).
# Writes bench/results/cluster.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh
devices=${DEVICES:-10000}
rate=${RATE:-20000}
seconds=${SECONDS_RUN:-15}
call_rates=${CALL_RATES:-"250 500 1000 2000"}
step_secs=${STEP_SECS:-10}
dir=$(mktemp -d /tmp/parley-cluster-bench.XXXXXX)
pids=()
cleanup() {
  trap '' INT TERM
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  stop_services
  rm -rf "$dir"
}
trap cleanup EXIT

. scripts/lib/build.sh
release_bin "${BENCH_BIN:-}"

start_postgres "$dir"
start_nats "$dir"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/provider-key.pem" 2>/dev/null
openssl pkey -in "$dir/provider-key.pem" -pubout -out "$dir/provider-pub.pem"
cat > "$dir/parley.toml" <<EOF
[courier]
provider_rate = 10000000
database = "$PG_URL"
# Devices that do not ping leave a courier silent for 2.5 of these (a
# node killed mid-run: its QUIC devices hear nothing say so).
ping_interval_secs = 10

[[courier.providers]]
name = "load"
team_id = "LOADTEAM01"
key_id = "LOADKEY001"
key = "$dir/provider-pub.pem"

[cluster]
nats = "$NATS_URL"
EOF

# Starts node NAME on HOST with CONFIG, admin on ADMIN_PORT, then the
# service and its flags; waits until it is ready. One data directory (CA,
# certificates) for all; --cluster-node names each.
start_node() { # name host config admin_port service flags...
  local name=$1 host=$2 config=$3 admin=$4; shift 4
  "$bin" --data "$dir/data" --config "$config" --admin "$host:$admin" --log warn \
    --cluster-node "$name" "$@" > "$dir/$name.out" 2> "$dir/$name.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q '^parley: ready' "$dir/$name.out" 2>/dev/null && break; sleep 0.1; done
  grep -q '^parley: ready' "$dir/$name.out" || { cat "$dir/$name.err"; exit 1; }
}
for i in 0 1 2; do
  host=127.0.0.$((i + 2))
  start_node "n$i" "$host" "$dir/parley.toml" 19090 courier \
    --courier-device-listen "$host:15223" --courier-provider-listen "$host:18443"
done

# Shards owned by node i (0 if it does not answer).
owned() {
  curl -s --max-time 2 "http://127.0.0.$(($1 + 2)):19090/metrics" \
    | awk '$1 == "parley_courier_shards_owned" { print $2; found = 1 } END { if (!found) print 0 }'
}
# Waits until nodes "$@" own all 256 shards between them; prints the seconds it took.
wait_owned() {
  local start total
  start=$EPOCHREALTIME
  for _ in $(seq 600); do
    total=0
    for i in "$@"; do total=$((total + $(owned "$i"))); done
    if [ "$total" -eq 256 ]; then
      awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f\n", b - a }'
      return
    fi
    sleep 0.1
  done
  echo "bench: shards not owned after 60 s" >&2
  exit 1
}
echo "bench: three nodes up; shards spread in $(wait_owned 0 1 2) s"
# Let the share even out (a joining node takes its share over a few rounds).
sleep 6

echo "bench: $devices devices over three nodes"
load=$("$bin" loadsim courier --data "$dir/data" \
  --device-addr 127.0.0.2:15223,127.0.0.3:15223,127.0.0.4:15223 \
  --provider-addr 127.0.0.2:18443,127.0.0.3:18443,127.0.0.4:18443 \
  --provider-key "$dir/provider-key.pem" --devices "$devices" --rate "$rate" \
  --seconds "$seconds" --server-pid "$(IFS=,; echo "${pids[*]}")" \
  --kill-pid "${pids[1]}" | tee /dev/stderr)
# loadsim killed n1 a third of the way into its third phase; the other
# two hold every shard by now.
wait_owned 0 2 > /dev/null
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done

# Calls across signaling nodes.
. bench/lib/sipp.sh
cat > "$dir/sip.toml" <<EOF
[signaling]
database = "$PG_URL"
domains = ["parley.test"]
allow_unauthenticated_calls = true
source_rate = 10000000
max_calls = 1000000

[[signaling.accounts]]
handle = "callee@bench.test"
password = "bench-password"

[cluster]
nats = "$NATS_URL"
EOF
for i in 0 1 2; do
  host=127.0.0.$((i + 2))
  start_node "s$i" "$host" "$dir/sip.toml" 19091 signaling \
    --sip-listen "$host:25060" --sip-tls-listen "$host:25061" --sip-wss-listen "$host:25062"
done
echo "bench: three signaling nodes up; the callee registers at s1"
sipp_callee 127.0.0.3:25060 27000 s1
pids+=("$uas")
calls="$dir/calls.txt"
: > "$calls"
for r in $call_rates; do
  for via in across one; do
    target=127.0.0.3:25060
    [ "$via" = across ] && target=127.0.0.2:25060
    read -r ok failed p50 p99 <<< "$(sipp_step "call-$via-$r" "$target" "$r" $((r * step_secs)) \
      -sf "$sipp_scenarios/bench/sipp/uac.xml" -s callee%40bench.test)"
    echo "$via $r $ok $failed $p50 $p99" >> "$calls"
    echo "bench: calls ($via node(s)), $r/s offered: $((ok / step_secs))/s done, $failed failed, p50 $p50 ms, p99 $p99 ms"
  done
done

report=bench/results/cluster.md
{
  echo "# Push courier: three nodes on one machine"
  echo
  echo "Run $(date -u +%Y-%m-%d) on $(nproc) cores: three \`parley courier\` nodes, PostgreSQL,"
  echo "nats-server and the load generator (\`parley loadsim courier\`) on the same cores."
  echo "Devices and provider connections spread over the three nodes: two pushes in three"
  echo "reach a node that does not hold the device's queue, and two devices in three are"
  echo "connected to a node that does not."
  echo
  echo "## $devices devices"
  echo
  grep '^|' <<<"$load"
  echo
  echo "Phase 3 kills node n1 with SIGKILL (shard leases 6 s): the rows about it are the"
  echo "failover."
  echo
  echo "## Calls"
  echo
  echo "Three \`parley signaling\` nodes; a SIPp callee registered at the second; SIPp"
  echo "callers (INVITE/200/ACK/BYE, ${step_secs} s per step) through the first node, so each"
  echo "call crosses to the callee's edge node (its bindings read from PostgreSQL, the"
  echo "INVITE relayed over TCP), then through the callee's own node. Set-up = INVITE"
  echo "to 200 at the caller, as SIPp measures it (in steps of about 4 ms here)."
  echo
  echo "| offered calls/s | path | done/s | failed | set-up p50 ms | set-up p99 ms |"
  echo "|---|---|---|---|---|---|"
  awk -v s="$step_secs" '{ printf "| %s | %s | %d | %s | %s | %s |\n", $2, ($1 == "across" ? "across two nodes" : "one node"), $3 / s, $4, $5, $6 }' "$calls"
} > "$report"
cat "$report"
echo "bench: wrote $report"
