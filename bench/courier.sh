#!/usr/bin/env bash
# Starts `parley courier` (release) on a fresh data directory on loopback,
# connects DEVICES simulated devices with `parley loadsim courier` (QUIC_PCT
# percent over QUIC, the rest TLS over TCP, spread over worker processes
# and 127.0.1.x source addresses because one process may hold 20,000 files
# and one source address has ~28k ports), samples the courier's resident
# memory per connection, then pushes through the APNs-style API over HTTP/2:
# phase 1 at RATE pushes/s offered (throughput), phase 2 at half of what
# phase 1 achieved (latency). The load generator shares the 2 cores.
#
#   bench/courier.sh                           100,000 devices
#   DEVICES=10000 RATE=20000 bench/courier.sh  quick
#   DB=postgres://… bench/courier.sh           on PostgreSQL
#   BENCH_BIN=/tmp/parley bench/courier.sh    a prebuilt binary (compare builds)
#
# Then the store path alone: STORE_DEVICES (10,000) devices that go offline
# after getting their token, pushed at STORE_RATE (80,000/s offered). Past
# a million pushes their queues are full (cap 100), so the end of the run
# also drops the oldest message with every push (STORE_DEVICES=2000: mostly
# that path).
# Needs openssl (to make the provider key).
#
# Writes bench/results/courier.md next to the published anchors.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${DEVICES:-100000}
quic_pct=${QUIC_PCT:-85}
rate=${RATE:-30000}
seconds=${SECONDS_RUN:-15}
. bench/lib/courier.sh
courier_bench courier
loadsim() {
  "$bin" loadsim courier --data "$dir/data" --device-addr 127.0.0.1:15223 \
    --provider-addr 127.0.0.1:18443 --provider-key "$dir/provider-key.pem" \
    --seconds "$seconds" --server-pid "$server" "$@" | tee /dev/stderr
}

# 1. Many devices online: connections, memory, delivery, latency.
echo "bench: $devices devices online"
start_courier
online=$(loadsim --devices "$devices" --quic-percent "$quic_pct" --rate "$rate")
stop_courier

# 2. The store path alone: devices offline, every push only made durable.
echo "bench: store path (${STORE_DEVICES:-10000} devices offline)"
start_courier
store=$(loadsim --devices "${STORE_DEVICES:-10000}" --offline-percent 100 \
  --rate "${STORE_RATE:-80000}" --concurrency 2048)
stop_courier

report=bench/results/courier.md
{
  echo "# Push courier under load"
  echo
  echo "Run $(date -u +%Y-%m-%d) on $(nproc) cores, ${DB:+PostgreSQL}${DB:-SQLite (WAL, synchronous=FULL)};"
  echo "load generator (\`parley loadsim courier\`) on the same cores."
  echo
  echo "## $devices devices online ($quic_pct% QUIC)"
  echo
  grep '^|' <<<"$online"
  echo
  echo "## Store path: pushes to offline devices, each durable before its 2xx"
  echo
  grep '^|' <<<"$store" | grep -v latency
  echo
  echo "Anchors: autopush-rs 10.27 kB per connection (400k connections on an m4.large);"
  echo "WhatsApp ~2.3M connections on 24 cores / 96 GB (~42 kB each)."
} > "$report"
cat "$report"
echo "bench: wrote $report"
