#!/usr/bin/env bash
# Builds and runs the whole Parley stack in one process, with its data in
# ./parley-data (created on first start). Extra arguments go to `parley up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --build
exec cargo run --release --locked -p parley -- up "$@"
