#!/usr/bin/env bash
# What a group call costs and sounds like on the devices (a benchmark, not
# a test):
#
#   1. SFrame (RFC 9605) per frame: encrypting and decrypting a 20 ms Opus
#      frame (120 bytes) and a video frame (12 KB), and sealing and opening
#      a sender key (HPKE to the device's key, signed) as a member joins
#      (criterion, wire/benches/sframe.rs).
#   2. Audio of an eight-person call through the SFU on loopback, in real
#      time, when one of the eight loses nothing, 10% of what reaches it,
#      and 10% both ways: tone shares, FEC, concealment and MOS for what it
#      hears, what the others hear of it, and what they hear of each other
#      (client-sdk/benches/group_quality.rs).
#
# Release builds; about 5 minutes once built. Writes
# bench/results/group-call.md.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --build
echo "bench: SFrame and sender keys (criterion)"
sframe=$(cargo bench --locked -q -p wire --bench sframe -- --output-format bencher 2>/dev/null |
  sed -nE 's/^test (.*) \.\.\. bench: +([0-9,]+) ns\/iter.*/\1|\2/p' | tr -d , |
  awk -F'|' '{ printf "| %s | %.2f µs |\n", $1, $2 / 1000 }')
echo "$sframe"
echo "bench: an eight-person call with one on a lossy network (36 s)"
quality=$(cargo bench --locked -q -p client-sdk --bench group_quality 2>/dev/null | grep '^|')
echo "$quality"

report=bench/results/group-call.md
{
  echo "# Group calls on the devices: SFrame's cost, audio under loss"
  echo
  echo "Measured $(date -u +%Y-%m-%d) on this machine ($(nproc) cores), release build,"
  echo "by \`bench/group-call.sh\`. The machine is shared: compare within a run."
  echo
  echo "## SFrame per frame and sender keys (criterion's estimate)"
  echo
  echo "| what | time |"
  echo "|---|---|"
  echo "$sframe"
  echo
  echo "## Eight people through the SFU, one on a lossy network (last 8 s of 12)"
  echo
  echo "Tone share is each speaker's tone in the listener's mix times the seven"
  echo "speakers mixed: 1.00 is every speaker heard in full."
  echo
  echo "$quality"
} > "$report"
echo "bench: wrote $report"
