#!/usr/bin/env bash
# Calls end to end (a benchmark, not a test), on this machine's loopback:
#
#   1. CALLS (default 50) warm calls Alice → Bob through `parley demo
#      --calls`: the whole stack and three SDK devices in one process, relay
#      only, Bob's phone asleep and woken by push each time. Reports dial →
#      first audio played at the callee and push wake → ringing, p50/p95.
#   2. CPU of that process during a call, audio only and audio + video
#      (median over CPU_CALLS calls of 5 s), against its idle baseline.
#      Both endpoints, the relay and the idle services share the process,
#      so "the call costs" is both devices' media plus the relay's share.
#   3. Audio quality under 0/5/10/20% random loss on the simulated wire
#      (client-sdk/benches/call_quality.rs).
#
# Writes bench/results/call.md. Targets (DESIGN.md / the SDK issue): p50
# dial → first audio ≤ 300 ms; ≤ 5% of one core per audio call.
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${CALLS:-50}
cpu_calls=${CPU_CALLS:-8}

scripts/install-deps.sh --build
echo "bench: building parley (release)"
cargo build --release --locked -q -p parley
bin=target/release/parley

run() { RUST_LOG=warn "$bin" demo "$@" | tee /dev/stderr | grep '^bench:'; }
echo "bench: $calls warm calls, audio only"
latency=$(run --calls "$calls" --seconds 1 --no-video)
echo "bench: CPU, audio only"
cpu_audio=$(run --calls "$cpu_calls" --seconds 5 --no-video | grep CPU)
echo "bench: CPU, audio and video"
cpu_video=$(run --calls "$cpu_calls" --seconds 5 | grep CPU)
echo "bench: audio quality under loss (simulated wire)"
quality=$(cargo bench --locked -q -p client-sdk --bench call_quality 2>/dev/null | grep '^|')

report=bench/results/call.md
{
  echo "# Calls: latency, CPU, audio quality"
  echo
  echo "Measured $(date -u +%Y-%m-%d) on this machine ($(nproc) cores), release build,"
  echo "by \`bench/call.sh\`. Figures are medians unless they say otherwise;"
  echo "the machine is shared, so compare ratios rather than absolutes."
  echo
  echo "## Latency ($calls warm calls, relay only, loopback)"
  echo
  echo '```'
  echo "$latency"
  echo '```'
  echo
  echo "## CPU of the whole process during a call"
  echo
  echo '```'
  echo "audio:         ${cpu_audio#bench: }"
  echo "audio + video: ${cpu_video#bench: }"
  echo '```'
  echo
  echo "## Audio under random loss (20 s call, simulated wire, both directions)"
  echo
  echo "$quality"
} > "$report"
echo "bench: wrote $report"
