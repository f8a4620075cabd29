# Sourced by the scripts that run release builds of parley.
#
#   release_bin PREBUILT   sets `bin`: PREBUILT if given (a binary built
#                          before, to compare builds or skip the build),
#                          else target/release/parley, built now

release_bin() {
  if [ -n "${1:-}" ]; then
    bin=$1
  else
    echo "building parley (release)" >&2
    cargo build --release --locked -q -p parley
    bin=target/release/parley
  fi
}
