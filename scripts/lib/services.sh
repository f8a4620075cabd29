# Sourced by scripts/cluster.sh and bench/cluster.sh: a throwaway
# PostgreSQL and nats-server in a temporary directory, on 127.0.0.1, for
# the life of the calling script. Needs Debian's postgresql and
# nats-server (scripts/install-deps.sh installs both).
#
#   start_postgres DIR   sets PG_URL
#   start_nats DIR       sets NATS_URL
#   stop_services        stops both (call it from the script's EXIT trap)

_pg_dir=""
_nats_pid=""

_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Runs a PostgreSQL tool as the postgres user when we are root
# (PostgreSQL refuses to run as root).
_pg() {
  local tool=$1; shift
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -x "$bin/$tool" ] || { echo "PostgreSQL is not installed; run scripts/install-deps.sh" >&2; exit 1; }
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$bin/$tool" "$@"
  else
    "$bin/$tool" "$@"
  fi
}

start_postgres() {
  _pg_dir="$1/postgres"
  mkdir -p "$_pg_dir"
  if [ "$(id -u)" -eq 0 ]; then
    # The postgres user must get through DIR (mktemp makes it 0700).
    chmod a+x "$1"
    chown postgres: "$_pg_dir"
  fi
  local port
  port=$(_free_port)
  _pg initdb -D "$_pg_dir/data" -U parley --auth=trust -E UTF8 --no-sync >/dev/null
  _pg pg_ctl -D "$_pg_dir/data" -o "-c listen_addresses=127.0.0.1 -p $port -k $_pg_dir -F -c max_connections=300" \
    -l "$_pg_dir/log" -w -t 30 start >/dev/null
  PG_URL="postgres://parley@127.0.0.1:$port/postgres"
}

start_nats() {
  local nats
  nats=$(command -v nats-server || echo /usr/sbin/nats-server)
  [ -x "$nats" ] || { echo "nats-server is not installed; run scripts/install-deps.sh" >&2; exit 1; }
  local port
  port=$(_free_port)
  "$nats" -a 127.0.0.1 -p "$port" > "$1/nats.log" 2>&1 &
  _nats_pid=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  NATS_URL="nats://127.0.0.1:$port"
}

stop_services() {
  if [ -n "$_nats_pid" ]; then
    kill "$_nats_pid" 2>/dev/null || true
    wait "$_nats_pid" 2>/dev/null || true
    _nats_pid=""
  fi
  if [ -n "$_pg_dir" ]; then
    _pg pg_ctl -D "$_pg_dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
    _pg_dir=""
  fi
}
