#!/usr/bin/env bash
# Installs what Parley needs beyond the Rust toolchain. Safe to run again:
# it installs only what is missing.
#
#   scripts/install-deps.sh --build   only what building needs (scripts/up.sh)
#   scripts/install-deps.sh --cluster that, PostgreSQL and nats-server (scripts/cluster.sh)
#   scripts/install-deps.sh           that, and what the tests and benchmarks need
#   scripts/install-deps.sh --bench   all that, and Janus (bench/sfu-vs-janus.sh's anchor)
#
# To build:
#   cmake        builds the Opus codec (libopus, bundled by the `opus` crate)
#                that the client SDK's media engine links statically
#   libssl-dev, pkg-config
#                OpenSSL, the client SDK's DTLS for third-party SIP phones
#                (their RSA certificates)
#
# To test:
#   coturn       turnutils_uclient, turnutils_stunclient, turnutils_natdiscovery,
#                turnutils_peer (interop tests) and turnserver (the benchmark anchor)
#   stun-client  the classic RFC 3489 `stun` client (interop tests)
#   procps       `kill` and `ps`, used by the tests and benchmarks
#   postgresql   a PostgreSQL server the identity service's tests start
#                in a temporary directory (no system cluster is used)
#   curl         the courier's APNs-style API is tested with curl --http2
#   nodejs, npm  run the npm `web-push` sender against the courier
#   sip-tester   SIPp: registration and call scenarios against signaling
#   baresip-core baresip: a real SIP user agent calling through signaling
#                and the relay with ICE and DTLS-SRTP
#   iproute2     `ip netns`: the baresip test gives each instance a network
#                namespace of its own
#   nats-server  the message bus between cluster nodes; the cluster tests
#                start their own in a temporary directory
#   python3, python3-pip
#                the Python binding's test, and pip for the PyPI tools below
#   janus        (--bench only) the Janus WebRTC server, whose VideoRoom plugin
#                is the SFU benchmark's anchor
#   libasound2-dev
#                ALSA, for `parley client`'s sound-card feature (CI builds it
#                and runs a call on ALSA's null device)
#
# from PyPI:
#   schemathesis API fuzzing from the identity service's OpenAPI document
#   aiosmtpd     a real SMTP server for the email code sender's test
#   pywebpush    a real Web Push sender for the courier's interop test
#
# and from npm, into push-courier/tests/interop/node_modules:
#   web-push          the other real Web Push sender
#   @parse/node-apn   a real APNs client library, pointed at the courier
set -euo pipefail

build_only=false
cluster=false
bench=false
case "${1:-}" in
  --build) build_only=true ;;
  --cluster) build_only=true; cluster=true ;;
  --bench) bench=true ;;
  "") ;;
  *) echo "usage: $0 [--build|--cluster|--bench]" >&2; exit 2 ;;
esac

packages=(cmake pkg-config libssl-dev)
commands=(cmake pkg-config openssl.pc)
if $cluster; then
  packages+=(postgresql nats-server python3)
  commands+=(initdb nats-server python3)
fi
if ! $build_only; then
  packages+=(coturn stun-client procps postgresql curl nodejs npm sip-tester baresip-core iproute2 libasound2-dev python3 python3-pip nats-server)
  commands+=(turnutils_uclient stun kill initdb curl node npm sipp baresip ip alsa.pc python3 pip.module nats-server)
fi
if $bench; then
  packages+=(janus)
  commands+=(janus)
fi

# initdb lives outside PATH on Debian, under /usr/lib/postgresql/<version>/bin.
have() {
  if [ "$1" = nats-server ]; then
    # Debian puts it in /usr/sbin, which a user's PATH may lack.
    command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]
  elif [ "$1" = initdb ]; then
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
  elif [ "$1" = pip.module ]; then
    # Any python3 with pip will do (a pyenv or venv one too).
    python3 -m pip --version >/dev/null 2>&1
  elif [ "${1%.pc}" != "$1" ]; then
    # A library, not a command: its pkg-config file.
    pkg-config --exists "${1%.pc}" 2>/dev/null
  else
    command -v "$1" >/dev/null 2>&1
  fi
}

missing=()
for i in "${!packages[@]}"; do
  have "${commands[$i]}" || missing+=("${packages[$i]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's coturn, postgresql and nats-server packages ship system services; Parley's
  # tests start their own servers, so make sure none is left holding ports.
  if command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now coturn >/dev/null 2>&1 || true
    $sudo systemctl disable --now postgresql >/dev/null 2>&1 || true
    $sudo systemctl disable --now nats-server >/dev/null 2>&1 || true
    $sudo systemctl disable --now janus >/dev/null 2>&1 || true
  fi
  for i in "${!packages[@]}"; do
    if ! have "${commands[$i]}"; then
      echo "install-deps: ${packages[$i]} did not provide ${commands[$i]}" >&2
      if [ "${commands[$i]}" = pip.module ]; then
        echo "install-deps: python3 is $(command -v python3); python3 -m pip says:" >&2
        python3 -m pip --version >&2 || true
      fi
      exit 1
    fi
  done
fi
$build_only && exit 0

pip_flags=(--quiet --disable-pip-version-check --root-user-action=ignore)
# Debian's own python3 refuses system-wide installs (PEP 668) unless told;
# these tools are for the tests of this checkout only.
if python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")))'; then
  pip_flags+=(--break-system-packages)
fi

schemathesis_version=4.32.5
if ! have schemathesis; then
  echo "install-deps: installing schemathesis $schemathesis_version from PyPI"
  python3 -m pip install "${pip_flags[@]}" \
    "schemathesis==$schemathesis_version"
  have schemathesis || { echo "install-deps: schemathesis installed but is not on PATH ($(python3 -m site --user-base)/bin?)" >&2; exit 1; }
fi
aiosmtpd_version=1.4.6
if ! python3 -c 'import aiosmtpd' >/dev/null 2>&1; then
  echo "install-deps: installing aiosmtpd $aiosmtpd_version from PyPI"
  python3 -m pip install "${pip_flags[@]}" \
    "aiosmtpd==$aiosmtpd_version"
fi
pywebpush_version=2.5.0
if ! python3 -c 'import pywebpush' >/dev/null 2>&1; then
  echo "install-deps: installing pywebpush $pywebpush_version from PyPI"
  python3 -m pip install "${pip_flags[@]}" \
    "pywebpush==$pywebpush_version"
fi
interop="$(cd "$(dirname "$0")/.." && pwd)/push-courier/tests/interop"
if [ ! -d "$interop/node_modules/web-push" ] || [ ! -d "$interop/node_modules/@parse/node-apn" ]; then
  echo "install-deps: installing npm web-push and @parse/node-apn (push-courier/tests/interop)"
  (cd "$interop" && npm ci --no-audit --no-fund --silent)
fi
