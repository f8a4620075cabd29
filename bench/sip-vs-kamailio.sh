#!/usr/bin/env bash
# The same SIPp scenarios against `parley signaling` (release) and against
# Kamailio (Debian's, an equivalent registrar + record-routing proxy: usrloc
# in memory, digest for REGISTER, no authentication for calls, tm, rr) on
# this machine, one after the other, ramping the offered rate step by step:
#
#   calls:          SIPp caller -> proxy -> one registered SIPp callee
#                   (INVITE/100/180/200/ACK/BYE/200, Record-Route kept);
#                   response time = INVITE to 200 at the caller
#   registrations:  REGISTER/401/REGISTER with digest/200 for one account,
#                   each call a new Call-ID refreshing the same binding;
#                   response time = second REGISTER to 200
#
# For every step it prints the achieved rate, failures, p50/p99 response
# time and the proxy's CPU (utime+stime of all its processes, from /proc)
# per call or registration. SIPp gets 4 MiB socket buffers (its default
# of 128 KiB drops responses in bursts at a few thousand per second, with
# either proxy). Then, per proxy, the highest rate with <0.1%
# failures and p99 <= 50 ms, and the ratios. SIPp shares the two cores.
#
#   bench/sip-vs-kamailio.sh
#   STEP_SECS=5 CALL_RATES="500 1000" REG_RATES="2000" bench/sip-vs-kamailio.sh   quick
#   KEEP=1 bench/sip-vs-kamailio.sh    keep the SIPp logs (errors per step)
#
# Writes bench/results/sip-vs-kamailio.md. Needs sipp and kamailio (it
# installs Debian's sip-tester and kamailio if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
step_secs=${STEP_SECS:-10}
call_rates=${CALL_RATES:-"1000 2000 3000 4000 5000 6000 8000"}
reg_rates=${REG_RATES:-"2500 5000 10000 15000 20000 25000"}
parley_port=25060
kamailio_port=35060
dir=$(mktemp -d /tmp/parley-sip-bench.XXXXXX)
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  pkill -f "$dir/kamailio.cfg" 2>/dev/null || true
  pkill -f "sipp.*$dir" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "bench: kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

need=()
command -v sipp >/dev/null || need+=(sip-tester)
command -v kamailio >/dev/null || need+=(kamailio)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench: installing ${need[*]}"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  command -v systemctl >/dev/null && $sudo systemctl disable --now kamailio >/dev/null 2>&1 || true
fi

echo "bench: building parley (release)"
cargo build --release --locked -q -p parley
bin=$PWD/target/release/parley
scen=$PWD/bench/sipp
tck=$(getconf CLK_TCK)

{
  echo "[signaling]"
  echo "listen = \"127.0.0.1:$parley_port\""
  echo "tls = \"127.0.0.1:$((parley_port + 1))\""
  echo "wss = \"127.0.0.1:$((parley_port + 2))\""
  echo "domains = [\"parley.test\"]"
  echo "allow_unauthenticated_calls = true"
  echo "source_rate = 10000000"
  echo "max_calls = 1000000"
  echo "[[signaling.accounts]]"
  echo "handle = \"callee@bench.test\""
  echo "password = \"bench-password\""
  echo "[[signaling.accounts]]"
  echo "handle = \"bench@bench.test\""
  echo "password = \"bench-password\""
} > "$dir/parley.toml"

cat > "$dir/kamailio.cfg" <<EOF
#!KAMAILIO
debug=1
log_stderror=yes
children=4
tcp_children=2
listen=udp:127.0.0.1:$kamailio_port
listen=tcp:127.0.0.1:$kamailio_port
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "sanity.so"
loadmodule "auth.so"
modparam("usrloc", "db_mode", 0)
modparam("rr", "append_fromtag", 1)
modparam("registrar", "max_contacts", 32)
modparam("auth", "secret", "bench-secret")

request_route {
  if (!mf_process_maxfwd_header("10")) { sl_send_reply("483", "Too Many Hops"); exit; }
  if (!sanity_check()) { exit; }
  if (is_method("CANCEL")) { if (t_check_trans()) { route(RELAY); } exit; }
  if (!is_method("ACK")) {
    if (t_precheck_trans()) { t_check_trans(); exit; }
    t_check_trans();
  }
  if (has_totag()) {
    if (loose_route()) { route(RELAY); exit; }
    if (is_method("ACK")) { if (t_check_trans()) { route(RELAY); } exit; }
    sl_send_reply("404", "Not here");
    exit;
  }
  remove_hf("Route");
  if (is_method("INVITE")) { record_route(); }
  if (is_method("REGISTER")) {
    if (!pv_www_authenticate("\$td", "bench-password", "0")) {
      www_challenge("\$td", "1");
      exit;
    }
    if (!save("location")) { sl_reply_error(); }
    exit;
  }
  if (!lookup("location")) { sl_send_reply("480", "Temporarily Unavailable"); exit; }
  route(RELAY);
}

route[RELAY] {
  if (!t_relay()) { sl_reply_error(); }
  exit;
}
EOF

start_parley() {
  "$bin" --data "$dir/data" --config "$dir/parley.toml" --admin 127.0.0.1:0 --log warn signaling \
    > "$dir/server.out" 2> "$dir/server.err" &
  server=$!
  for _ in $(seq 100); do grep -q '^parley: ready' "$dir/server.out" 2>/dev/null && break; sleep 0.1; done
  grep -q '^parley: ready' "$dir/server.out" || { cat "$dir/server.err"; exit 1; }
  pids="$server"
}

start_kamailio() {
  kamailio -f "$dir/kamailio.cfg" -P "$dir/kamailio.pid" -w "$dir" -m 512 -M 32 -DD -E \
    > "$dir/kamailio.out" 2>&1 &
  server=$!
  sleep 2
  pids=$(pgrep -f "$dir/kamailio.cfg" | tr '\n' ' ' || true)
  [ -n "$pids" ] || { cat "$dir/kamailio.out"; exit 1; }
}

stop_server() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  pkill -f "$dir/kamailio.cfg" 2>/dev/null || true
  server=""
  sleep 1
}

cpu_ticks() {
  local t=0 p f
  for p in $pids; do
    [ -r "/proc/$p/stat" ] || continue
    read -r -a f < "/proc/$p/stat"
    t=$((t + f[13] + f[14]))
  done
  echo "$t"
}

. bench/lib/sipp.sh

results="$dir/results.txt"
: > "$results"

run_proxy() { # label port
  local label=$1 port=$2
  echo "bench: $label: registering the callee"
  sipp_callee "127.0.0.1:$port" 27000 "$label"
  for r in $call_rates; do
    measure_step call "$label" "$port" "$r" -sf "$scen/uac.xml" -s callee%40bench.test
  done
  kill "$uas" 2>/dev/null || true
  wait "$uas" 2>/dev/null || true
  for r in $reg_rates; do
    measure_step reg "$label" "$port" "$r" -sf "$scen/reg.xml" -s bench%40bench.test \
      -au bench@bench.test -ap bench-password -auth_uri parley.test
  done
}

# One step at one rate: SIPp runs, the proxy's CPU is read around it, and
# a line "kind label offered done/s failed% p50 p99 cpu_us cpu%" is added
# to the results and printed.
measure_step() { # kind label port rate sipp-args...
  local kind=$1 label=$2 port=$3 r=$4; shift 4
  local before after line ok failed p50 p99
  before=$(cpu_ticks)
  line=$(sipp_step "$kind-$label-$r" "127.0.0.1:$port" "$r" $((r * step_secs)) "$@")
  after=$(cpu_ticks)
  read -r ok failed p50 p99 <<< "$line"
  awk -v k="$kind" -v l="$label" -v r="$r" -v ok="$ok" -v f="$failed" -v p50="$p50" -v p99="$p99" \
      -v t="$((after - before))" -v tck="$tck" -v s="$step_secs" \
    'BEGIN { tot=ok+f; fp=(tot>0)?100*f/tot:100; cpu=(ok>0)?1e6*t/tck/ok:0;
             printf "%s %s %d %.0f %.3f %s %s %.0f %.2f\n", k, l, r, ok/s, fp, p50, p99, cpu, 100*t/tck/s }' >> "$results"
  tail -1 "$results" | awk '{ what = ($1 == "call") ? "calls   " : "REGISTER"; unit = ($1 == "call") ? "call" : "reg";
    printf "bench: %-8s %s offered %5d/s: %6d/s done, %6.3f%% failed, p50 %s ms, p99 %s ms, %s us CPU/%s, %s%% CPU\n", $2, what, $3, $4, $5, $6, $7, $8, unit, $9 }'
}

start_parley
run_proxy parley "$parley_port"
stop_server
start_kamailio
run_proxy kamailio "$kamailio_port"
stop_server

# The best step per proxy and kind: <0.1% failures and p99 <= 50 ms.
best() { # kind label -> "rate cpu_us"
  awk -v k="$1" -v l="$2" '$1==k && $2==l && $5<0.1 && $7!="-" && $7<=50 { if ($4>r) { r=$4; c=$8 } } END { printf "%d %d\n", r, c }' "$results"
}
read -r pc pcc <<< "$(best call parley)"
read -r kc kcc <<< "$(best call kamailio)"
read -r pr prc <<< "$(best reg parley)"
read -r kr krc <<< "$(best reg kamailio)"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b>0) printf "%.2f", a/b; else print "-" }'; }

out=bench/results/sip-vs-kamailio.md
{
  echo "# SIP proxy: parley signaling vs Kamailio $(kamailio -v | head -1 | awk '{print $3}')"
  echo
  echo "$(date -u +%Y-%m-%d), $(nproc) cores, SIPp $(sipp -v 2>/dev/null | grep -o 'v[0-9.]*' | head -1) on the same machine, ${step_secs} s per step."
  echo
  echo "| proxy | kind | offered/s | done/s | failed % | p50 ms | p99 ms | CPU µs per call/reg | proxy CPU % |"
  echo "|---|---|---|---|---|---|---|---|---|"
  awk '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $2, ($1=="call"?"call":"REGISTER"), $3, $4, $5, $6, $7, $8, $9 }' "$results"
  echo
  echo "Highest rate with <0.1% failures and p99 <= 50 ms:"
  echo
  echo "| | parley | Kamailio | ratio |"
  echo "|---|---|---|---|"
  echo "| calls/s | $pc | $kc | $(ratio "$pc" "$kc") |"
  echo "| CPU µs per call there | $pcc | $kcc | $(ratio "$pcc" "$kcc") |"
  echo "| registrations/s | $pr | $kr | $(ratio "$pr" "$kr") |"
  echo "| CPU µs per registration there | $prc | $krc | $(ratio "$prc" "$krc") |"
} > "$out"
cat "$out"
