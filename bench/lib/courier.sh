# Sourced by the benchmarks of one `parley courier` (bench/courier.sh,
# bench/upstream.sh): a temporary directory removed on exit with the
# courier, the load provider's key pair and configuration, and starting
# and stopping the courier on 127.0.0.1:15223 (devices) and :18443
# (providers).
#
#   courier_bench NAME   sets `dir` and `bin` (the release build, or
#                        BENCH_BIN), makes the provider's key pair and
#                        writes $dir/parley.toml (more may be appended)
#   start_courier        starts it on a fresh data directory; sets `server`
#   stop_courier

courier_bench() {
  dir=$(mktemp -d "/tmp/parley-$1-bench.XXXXXX")
  server=""
  trap courier_cleanup EXIT
  . scripts/lib/build.sh
  release_bin "${BENCH_BIN:-}"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/provider-key.pem" 2>/dev/null
  openssl pkey -in "$dir/provider-key.pem" -pubout -out "$dir/provider-pub.pem"
  cat > "$dir/parley.toml" <<CONF
[courier]
provider_rate = 10000000
${DB:+database = "$DB"}

[[courier.providers]]
name = "load"
team_id = "LOADTEAM01"
key_id = "LOADKEY001"
key = "$dir/provider-pub.pem"
CONF
}

courier_cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$dir"
}

start_courier() {
  rm -rf "$dir/data"
  "$bin" --data "$dir/data" --config "$dir/parley.toml" --admin 127.0.0.1:0 --log warn courier \
    --courier-device-listen 127.0.0.1:15223 --courier-provider-listen 127.0.0.1:18443 \
    > "$dir/server.out" 2> "$dir/server.err" &
  server=$!
  for _ in $(seq 100); do grep -q '^parley: ready' "$dir/server.out" 2>/dev/null && break; sleep 0.1; done
  grep -q '^parley: ready' "$dir/server.out" || { cat "$dir/server.err"; exit 1; }
}

stop_courier() { kill "$server"; wait "$server" 2>/dev/null || true; server=""; }
