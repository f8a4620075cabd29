#!/usr/bin/env bash
# Loads HANDLES handles (default 1,000,000) into a fresh identity directory
# on SQLite, then drives POST /v1/lookup over HTTPS (TLS 1.3, the client
# presenting its device certificate as the SDK does, or signing each
# request with AUTH=signature; one random handle per request, every
# response carrying an akd lookup proof) from CLIENTS keep-alive
# connections for SECONDS, and prints
# lookups/s, p50/p99 latency, the process's CPU per lookup, the load's
# publish rate and the time of one epoch of 1000 changes on the full
# directory. The load generator runs in the same process on the same 2
# cores, so figures are conservative; CPU per lookup is the steadier figure
# on a shared machine.
#
#   bench/ids-lookup.sh                       1M handles (~5 min load)
#   HANDLES=100000 bench/ids-lookup.sh        quick
#   DB=postgres://… bench/ids-lookup.sh       on PostgreSQL
#   AUTH=signature bench/ids-lookup.sh        signed requests, no client certificate
#
# Writes bench/results/ids-lookup.md.
set -euo pipefail
cd "$(dirname "$0")/.."
handles=${HANDLES:-1000000}
seconds=${SECONDS_RUN:-20}
clients=${CLIENTS:-8}
dir=$(mktemp -d /tmp/parley-ids-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT

echo "bench: building the lookup bench (release)"
cargo build --release --locked -q -p ids --example lookup_bench
args=(--handles "$handles" --seconds "$seconds" --clients "$clients" --dir "$dir" --auth "${AUTH:-mtls}")
[ -n "${DB:-}" ] && args+=(--db "$DB")
out=$(target/release/examples/lookup_bench "${args[@]}" | tee /dev/stderr)
get() { awk -v k="$1" '$1 == k {print $2}' <<<"$out"; }

report=bench/results/ids-lookup.md
{
  echo "# Identity lookups with key transparency proofs"
  echo
  echo "Run $(date -u +%Y-%m-%d) on $(nproc) cores, ${DB:+PostgreSQL}${DB:-SQLite}; client in the same process."
  echo
  echo "| | value | target |"
  echo "|---|---|---|"
  echo "| handles in the directory | $(get handles) | 1,000,000 |"
  echo "| lookups/s ($(get clients) connections, device authenticated by $(get auth)) | $(get lookups_per_sec) | ≥ 5,000 |"
  echo "| p50 latency | $(get p50_ms) ms | |"
  echo "| p99 latency | $(get p99_ms) ms | ≤ 10 ms |"
  echo "| CPU per lookup, server and client together | $(get cpu_us_per_lookup) µs | |"
  echo "| failed lookups | $(get failed_lookups) | 0 |"
  echo "| epoch of 1000 changes at full size | $(get epoch_1000_changes_ms) ms | epochs ≤ 10 s apart |"
  echo "| bulk publish rate while loading | $(get load_publish_values_per_sec) values/s | |"
  echo "| database size | $(get database_mb) MB | |"
} > "$report"
cat "$report"
echo "bench: wrote $report"
