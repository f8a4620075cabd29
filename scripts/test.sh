#!/usr/bin/env bash
# Runs every test: unit, property, scenario, interop (coturn and stun-client
# tools against the real relay on loopback) and the command line end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The bindings' tests load the shared library an app would ship, which
# `cargo test` does not build.
cargo build -p parley-ffi --locked
cargo test --workspace --locked "$@"
