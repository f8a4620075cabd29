#!/usr/bin/env bash
# Wake-ups through Apple: starts `parley courier` (release) on a fresh data
# directory on loopback with [courier.upstream.apns] pointing at an APNs
# stand-in that `parley loadsim upstream` plays (HTTP/2 over TLS, answering
# 200 as Apple does), puts DEVICES devices to sleep with APNs tokens
# registered over their links, and pushes to them through the APNs-style
# provider API: phase 1 at RATE pushes/s offered (how many wake-ups per
# second the courier gets Apple to take, over one HTTP/2 connection),
# phase 2 at half of that (the latency the courier adds, from the
# provider's 2xx to the wake-up reaching Apple). The load generator and
# the stand-in share the 2 cores with the courier.
#
#   bench/upstream.sh                              5,000 devices, 40,000/s offered
#   DEVICES=2000 RATE=20000 bench/upstream.sh      quick
#   BENCH_BIN=/tmp/parley bench/upstream.sh        a prebuilt binary
#
# Anchors (published, single node; not run here): gorush, a Go APNs/FCM
# push server, and Matrix's Sygnal report thousands to tens of thousands of
# pushes per second. Target: >= 20,000 wake-ups/s with p99 added latency
# <= 5 ms at half load.
# Needs openssl (for the keys and the stand-in's certificate).
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${DEVICES:-5000}
rate=${RATE:-40000}
seconds=${SECONDS_RUN:-10}
. bench/lib/courier.sh
courier_bench upstream

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
# The team's .p8 for Apple, and the stand-in's CA and certificate for
# "localhost".
key "$dir/AuthKey_LOADAPNS01.p8"
key "$dir/apple-ca-key.pem"
openssl req -x509 -new -key "$dir/apple-ca-key.pem" -subj /CN=apple-stand-in-ca -days 2 \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
  -out "$dir/apple-ca.pem" 2>/dev/null
key "$dir/apple-key.pem"
openssl req -new -key "$dir/apple-key.pem" -subj /CN=localhost -out "$dir/apple.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n' > "$dir/apple.ext"
openssl x509 -req -in "$dir/apple.csr" -CA "$dir/apple-ca.pem" -CAkey "$dir/apple-ca-key.pem" \
  -CAcreateserial -days 2 -extfile "$dir/apple.ext" -out "$dir/apple.pem" 2>/dev/null

cat >> "$dir/parley.toml" <<CONF

[courier.upstream.apns]
url = "127.0.0.1:19443"
server_name = "localhost"
ca = "$dir/apple-ca.pem"
key = "$dir/AuthKey_LOADAPNS01.p8"
key_id = "LOADAPNS01"
team_id = "LOADTEAM01"
CONF

start_courier

echo "bench: $devices sleeping devices, $rate pushes/s offered"
"$bin" loadsim upstream --data "$dir/data" --device-addr 127.0.0.1:15223 \
  --provider-addr 127.0.0.1:18443 --provider-key "$dir/provider-key.pem" \
  --sink-listen 127.0.0.1:19443 --sink-cert "$dir/apple.pem" --sink-key "$dir/apple-key.pem" \
  --devices "$devices" --rate "$rate" --seconds "$seconds" | tee "$dir/loadsim.out"
grep -q 'wake-ups taken' "$dir/loadsim.out"
