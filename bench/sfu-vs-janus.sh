#!/usr/bin/env bash
# Sends the same group-call load through Debian's Janus (VideoRoom plugin)
# and through `parley sfu`, one server at a time, and prints the ratios.
#
# The load is `parley loadsim sfu`: rooms whose participants each publish
# audio (50 packets/s) and one video layer (300 kb/s, 15 frames/s) and
# take up to 8 others' audio (the SDK's default) and up to 4 videos (both
# SFUs' last-N is 4); everyone talks at once. Payloads are opaque, as SFrame ciphertext is. For rooms of
# 4, 8 and 32 it reports packets forwarded per second, the SFU process's
# CPU time per forwarded packet (utime+stime from /proc), the latency a
# packet took from its sender to a receiver (p50/p99), loss (gaps of up to
# 12 packets) and what the SFU paused (longer gaps); then, with rooms of
# 8, the most participants each server held under 0.5% loss.
#
# Janus offers no loopback candidates, so both servers and the load run in
# a network namespace this script creates, on a veth address of its own
# (10.213.0.1); nothing leaves the machine. Needs root for `ip netns`.
#
#   bench/sfu-vs-janus.sh               full run (~6 minutes)
#   BENCH_QUICK=1 bench/sfu-vs-janus.sh rooms of 4 and 8, no capacity sweep
#
# Writes bench/results/sfu-vs-janus.md. The load generator shares the two
# cores with the server under test; its own CPU is in the table, and a
# capacity figure where it is near 1 s/s says more about it than about
# the server. Numbers on a shared machine are noisy: compare ratios from
# the same run, and repeat.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --bench

[ "$(id -u)" -eq 0 ] || { echo "bench: needs root (ip netns)" >&2; exit 1; }

tmp=$(mktemp -d /tmp/parley-bench.XXXXXX)
ns=parley-sfu-bench-$$
ip=10.213.0.1
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

ip netns add "$ns"
in_ns() { ip netns exec "$ns" "$@"; }
in_ns ip link set lo up
in_ns ip link add sfu0 type veth peer name sfu1
in_ns ip addr add "$ip/24" dev sfu0
in_ns ip link set sfu0 up
in_ns ip link set sfu1 up

echo "bench: building parley (release)"
cargo build --release --locked -q -p parley
parley_bin=$PWD/target/release/parley

seconds=${BENCH_SECONDS:-8}
if [ "${BENCH_QUICK:-}" = 1 ]; then
  sizes=(4 8)
  capacity=()
else
  sizes=(4 8 32)
  # Rooms of 8 at once, for the most participants held.
  capacity=(4 8 12 16 24)
fi

janus_api=127.0.0.1:18088
parley_api=127.0.0.1:28446

write_janus_config() {
  local lib=/usr/lib/x86_64-linux-gnu/janus
  [ -d "$lib" ] || lib=$(dirname "$(dirname "$(find /usr/lib -name libjanus_videoroom.so -print -quit)")")
  mkdir -p "$tmp/janus"
  cat >"$tmp/janus/janus.jcfg" <<EOF
general: {
  configs_folder = "$tmp/janus"
  plugins_folder = "$lib/plugins"
  transports_folder = "$lib/transports"
  events_folder = "$lib/events"
  loggers_folder = "$lib/loggers"
  debug_level = 3
  session_timeout = 120
}
media: { rtp_port_range = "40000-60000" }
nat: { ice_lite = true, ice_enforce_list = "sfu0" }
plugins: { disable = "libjanus_audiobridge.so,libjanus_duktape.so,libjanus_echotest.so,libjanus_lua.so,libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_voicemail.so" }
transports: { disable = "libjanus_websockets.so,libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so" }
loggers: { disable = "libjanus_jsonlog.so" }
events: { broadcast = false }
EOF
  cat >"$tmp/janus/janus.transport.http.jcfg" <<EOF
general: { json = "compact", base_path = "/janus", http = true, port = ${janus_api##*:}, ip = "${janus_api%%:*}", https = false }
admin: { admin_http = false }
EOF
  echo 'general: { }' >"$tmp/janus/janus.plugin.videoroom.jcfg"
}

start_janus() {
  # Not through in_ns: $! must be the server itself (ip execs it).
  ip netns exec "$ns" janus -F "$tmp/janus" -C "$tmp/janus/janus.jcfg" -o -N -L "$tmp/janus.log" >/dev/null 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  api=$janus_api
  for _ in $(seq 100); do
    in_ns curl -sf -o /dev/null -X POST -d '{"janus":"ping","transaction":"p"}' "http://$janus_api/janus" && return
    sleep 0.1
  done
  echo "bench: janus did not start; its log:" >&2; tail -20 "$tmp/janus.log" >&2; exit 1
}

start_parley() {
  PARLEY_SFU_MAX_TOTAL=4000 ip netns exec "$ns" "$parley_bin" --data "$tmp/parley-data" --admin 127.0.0.1:0 --log warn sfu \
    --sfu-listen "$ip:25004" --sfu-api-listen "$parley_api" >"$tmp/parley.log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  api=$parley_api
  for _ in $(seq 100); do
    grep -q "parley: ready" "$tmp/parley.log" 2>/dev/null && return
    sleep 0.1
  done
  echo "bench: parley sfu did not start; its log:" >&2; tail -20 "$tmp/parley.log" >&2; exit 1
}

# run NAME ROOMS SIZE → appends "NAME ROOMS SIZE <RESULT fields>" to results.
# Each run gets a freshly started server.
run() {
  local name=$1 rooms=$2 size=$3 out
  "start_$name"
  out=$(in_ns timeout 300 "$parley_bin" loadsim sfu --target "$name" --api "$api" \
          --data "$tmp/parley-data" --local "$ip" --rooms "$rooms" --room-size "$size" \
          --seconds "$seconds" --sfu-pid "$server_pid" 2>"$tmp/loadsim.err" || true)
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  local line
  line=$(grep '^RESULT ' <<<"$out" | tail -1 || true)
  if [ -z "$line" ]; then
    echo "bench: $name with $rooms room(s) of $size did not finish:" >&2
    tail -3 "$tmp/loadsim.err" >&2
    line="RESULT pps=0 cpu_s=- us_per_packet=- p50_ms=- p99_ms=- loss_pct=100 paused_pct=- generator_cpu_s=-"
  fi
  echo "$name $rooms $size $line" | tee -a "$tmp/results"
}

write_janus_config
: >"$tmp/results"
for size in "${sizes[@]}"; do
  run janus 1 "$size"
  run parley 1 "$size"
done
for rooms in "${capacity[@]}"; do
  run janus "$rooms" 8
  run parley "$rooms" 8
done

# --- summary ----------------------------------------------------------------
report=bench/results/sfu-vs-janus.md
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
{
  echo "# SFU: parley vs Janus VideoRoom"
  echo
  echo "Run $(date -u +%Y-%m-%d) on $(nproc) cores; $(janus --version 2>/dev/null | sed -n "s/^Janus version: [0-9]* (\(.*\))/Janus \1/p" | head -1);"
  echo "load: \`parley loadsim sfu\`, each participant sends audio (50 packets/s) and one"
  echo "300 kb/s video layer and takes up to 8 others' audio and 4 videos, everyone talking;"
  echo "${seconds} s measured per run. Latency is sender to receiver through the SFU, and includes"
  echo "the load generator's own polling (about 4 ms at light load). Loss counts gaps of up"
  echo "to 12 packets; longer gaps are streams the SFU paused."
  echo
  echo "| server | rooms × size | forwarded packets/s | SFU CPU s/s | CPU µs / forwarded packet | p50 ms | p99 ms | loss | paused | generator CPU s/s |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  while read -r name rooms size rest; do
    echo "| $name | $rooms × $size | $(field pps <<<"$rest") | $(field cpu_s <<<"$rest") | $(field us_per_packet <<<"$rest") | $(field p50_ms <<<"$rest") | $(field p99_ms <<<"$rest") | $(field loss_pct <<<"$rest")% | $(field paused_pct <<<"$rest")% | $(field generator_cpu_s <<<"$rest") |"
  done <"$tmp/results"
  echo
  echo "| rooms × size | CPU per packet, parley / janus | p99, parley / janus |"
  echo "|---|---|---|"
  awk '
    { for (i = 4; i <= NF; i++) { split($i, kv, "="); v[$1, $2, $3, kv[1]] = kv[2] } seen[$2 " " $3] = 1 }
    END {
      for (k in seen) {
        split(k, rs, " ")
        j = v["janus", rs[1], rs[2], "us_per_packet"]; p = v["parley", rs[1], rs[2], "us_per_packet"]
        jl = v["janus", rs[1], rs[2], "p99_ms"]; pl = v["parley", rs[1], rs[2], "p99_ms"]
        printf "| %s × %s | %s | %s |\n", rs[1], rs[2], (j + 0 > 0 && p != "-") ? sprintf("%.2f", p / j) : "-", (jl + 0 > 0 && pl != "-") ? sprintf("%.2f", pl / jl) : "-"
      }
    }' "$tmp/results" | sort -t'|' -k2 -n
  echo
  for name in janus parley; do
    best=$(awk -v n="$name" '$1 == n { split($0, a, "loss_pct="); split(a[2], b, " "); if (b[1] + 0 < 0.5 && $2 * $3 > m) m = $2 * $3 } END { print m + 0 }' "$tmp/results")
    echo "- $name: most participants held under 0.5% loss: $best"
  done
} >"$report"
echo
cat "$report"
echo
echo "bench: wrote $report"
