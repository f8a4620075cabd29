#!/usr/bin/env bash
# Relays the same turnutils_uclient load through Debian's coturn and through
# `parley turn`, one server at a time on loopback, at rising rates. For each
# server it reports the highest rate with under 0.1% loss, the round-trip
# time there, and the server's CPU time per relayed packet (utime+stime of
# the server process from /proc), then the ratios.
#
#   bench/turn-vs-coturn.sh            full run (~5 minutes)
#   BENCH_QUICK=1 bench/turn-vs-coturn.sh   three rates only
#
# Writes bench/results/turn-vs-coturn.md. A relayed packet is one datagram
# forwarded by the server: each echoed message counts twice (to the peer and
# back). Numbers on a shared 2-core machine are noisy: compare ratios from
# the same run, and repeat.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

tmp=$(mktemp -d /tmp/parley-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

secret=bench-secret
realm=bench.local
coturn_port=34780
parley_port=34790
peer_port=34800
clk=$(getconf CLK_TCK)

echo "bench: building parley (release)"
cargo build --release --locked -q -p parley
parley_bin=target/release/parley

# clients:interval_ms pairs; offered load = clients * 1000 / interval messages/s.
if [ "${BENCH_QUICK:-}" = 1 ]; then
  levels=("25:5" "50:2" "50:1")
else
  levels=("50:5" "50:2" "40:1" "60:1" "80:1" "100:1" "130:1")
fi
seconds=4

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

start_peer() {
  turnutils_peer -L 127.0.0.1 -p "$peer_port" >/dev/null 2>&1 &
  pids+=($!)
}

start_coturn() {
  mkdir -p "$tmp/coturn"
  turnserver -n --listening-ip=127.0.0.1 --relay-ip=127.0.0.1 --listening-port=$coturn_port \
    --use-auth-secret --static-auth-secret=$secret --realm=$realm --allow-loopback-peers \
    --no-cli --no-tls --no-dtls --min-port=49152 --max-port=65535 \
    --userdb="$tmp/coturn/turndb" --pidfile="$tmp/coturn/ts.pid" --log-file=stdout >"$tmp/coturn/log" 2>&1 &
  server_pid=$!
  pids+=($server_pid)
  server_port=$coturn_port
}

start_parley() {
  PARLEY_TURN_MAX_ALLOCATIONS_PER_IP=100000 PARLEY_TURN_MAX_ALLOCATIONS_PER_USER=100000 \
  "$parley_bin" --data "$tmp/parley-data" --admin 127.0.0.1:0 --log warn turn \
    --listen 127.0.0.1:$parley_port --tls-listen 127.0.0.1:0 --relay-ip 127.0.0.1 --realm $realm \
    --allow-peer 127.0.0.0/8 --rest-secret $secret >"$tmp/parley.log" 2>&1 &
  server_pid=$!
  pids+=($server_pid)
  server_port=$parley_port
}

# run_levels NAME → one line per level:
#   name clients interval offered sent recv lost rtt relayed cpu_us
# Each level gets a freshly started server: turnutils_uclient never frees
# its allocations, and a later run reusing a source port would meet them.
run_levels() {
  local name=$1
  for lv in "${levels[@]}"; do
    local m=${lv%%:*} z=${lv##*:}
    local n=$(( seconds * 1000 / z ))
    "start_$name"
    for _ in $(seq 50); do timeout 1 turnutils_stunclient -p "$server_port" 127.0.0.1 >/dev/null 2>&1 && break; sleep 0.1; done
    local pid=$server_pid before after out
    kill -0 "$pid" 2>/dev/null || { echo "bench: $name (pid $pid) is not running" >&2; exit 1; }
    before=$(cpu_ticks "$pid")
    out=$(timeout 120 turnutils_uclient -e 127.0.0.1 -r "$peer_port" -X -g -c -u bench -W "$secret" \
            -m "$m" -n "$n" -l 120 -z "$z" -p "$server_port" 127.0.0.1 2>&1 || true)
    after=$(cpu_ticks "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    local sent recv lost rtt
    # A level the client could not finish counts as all lost, not as an abort.
    sent=$(grep -o 'tot_send_msgs=[0-9]*' <<<"$out" | tail -1 | cut -d= -f2 || true)
    recv=$(grep -o 'tot_recv_msgs=[0-9]*' <<<"$out" | tail -1 | cut -d= -f2 || true)
    lost=$(grep -o 'Total lost packets [0-9]*' <<<"$out" | tail -1 | awk '{print $4}' || true)
    rtt=$(grep -o 'Average round trip delay [0-9.]*' <<<"$out" | tail -1 | awk '{print $5}' || true)
    if [ -z "$sent" ]; then
      echo "bench: $name at $m clients / ${z} ms did not finish; its last lines:" >&2
      tail -5 <<<"$out" >&2
    fi
    sent=${sent:-0}; recv=${recv:-0}; lost=${lost:-$sent}; rtt=${rtt:-nan}
    local relayed=$(( sent + recv ))
    local cpu_us=$(( (after - before) * 1000000 / clk ))
    local offered=$(( m * 1000 / z ))
    printf '%s %s %s %s %s %s %s %s %s %s\n' "$name" "$m" "$z" "$offered" "$sent" "$recv" "$lost" "$rtt" "$relayed" "$cpu_us" | tee -a "$tmp/results"
  done
}

: > "$tmp/results"
echo "bench: name clients interval_ms offered_msg/s sent recv lost rtt_ms relayed cpu_us"
start_peer
run_levels coturn
run_levels parley

# --- summary ----------------------------------------------------------------
report=bench/results/turn-vs-coturn.md
awk -v date="$(date -u +%Y-%m-%d)" -v cpus="$(nproc)" -v coturn="$(turnserver --version 2>/dev/null | head -1)" '
  {
    name=$1; offered=$4; sent=$5; recv=$6; lost=$7; rtt=$8; relayed=$9; cpu=$10
    loss = sent > 0 ? lost / sent : 1
    us = relayed > 0 ? cpu / relayed : 0
    rows[name] = rows[name] sprintf("| %s | %d | %d | %d | %.3f%% | %s | %.2f |\n", name, offered, sent, relayed, loss*100, rtt, us)
    if (loss < 0.001 && sent > 0) {
      if (offered > best[name]) { best[name]=offered; brtt[name]=rtt }
      cpu_sum[name]+=cpu; rel_sum[name]+=relayed
    }
  }
  END {
    print "# TURN relay: parley vs coturn\n"
    printf "Run %s on %s cores; coturn %s; load: turnutils_uclient, 120-byte messages, ChannelData, echoed by turnutils_peer.\n\n", date, cpus, coturn
    print "| server | offered msg/s | sent | relayed packets | loss | avg RTT ms | CPU µs / relayed packet |"
    print "|---|---|---|---|---|---|---|"
    printf "%s%s\n", rows["coturn"], rows["parley"]
    for (n in best) { per[n] = rel_sum[n] > 0 ? cpu_sum[n] / rel_sum[n] : 0 }
    print "| | coturn | parley | parley / coturn |"
    print "|---|---|---|---|"
    printf "| highest offered rate with <0.1%% loss (msg/s) | %d | %d | %.2f |\n", best["coturn"], best["parley"], best["coturn"] ? best["parley"]/best["coturn"] : 0
    printf "| avg RTT at that rate (ms) | %s | %s | |\n", brtt["coturn"], brtt["parley"]
    printf "| CPU µs per relayed packet (lossless runs) | %.2f | %.2f | %.2f |\n", per["coturn"], per["parley"], per["coturn"] ? per["parley"]/per["coturn"] : 0
  }' "$tmp/results" > "$report"
echo
cat "$report"
echo
echo "bench: wrote $report"
