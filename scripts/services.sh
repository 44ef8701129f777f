#!/usr/bin/env bash
# A private Mosquitto and a throwaway PostgreSQL for tests, on free loopback ports.
#
#   eval "$(scripts/services.sh start)"   # starts both, prints the exports below
#   python -m pytest tests/cloud          # the tests use FEDNANO_TEST_PG_URL / _MQTT_URL
#   scripts/services.sh stop              # stops both and deletes their data
#   scripts/services.sh status
#
# start prints:  export FEDNANO_TEST_PG_URL=postgresql://postgres@127.0.0.1:PORT/postgres
#                export FEDNANO_TEST_MQTT_URL=mqtt://127.0.0.1:PORT
# The broker allows anonymous clients unless --broker-files DIR names a folder holding the
# registry's generated `dynamic-security.json` (cloud.registry.write_broker_files).
# State lives in $FEDNANO_SERVICES_DIR (default /tmp/fednano-services-$UID). The machine's own
# PostgreSQL (5432) and Mosquitto (1883) are never touched. Missing packages (these two,
# chromium + chromium-driver for the dashboard's browser tests, qemu-user for the bundle's
# no-VNNI test) are installed with apt-get when running as root; otherwise the script says
# what to install.
set -euo pipefail

STATE=${FEDNANO_SERVICES_DIR:-/tmp/fednano-services-$(id -u)}
MAX_PACKET=8388608   # 8 MiB (set max_packet_size, not message_size_limit)

log() { echo "services.sh: $*" >&2; }
die() { log "$*"; exit 1; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_bindir() {
  local dir
  if command -v pg_config >/dev/null 2>&1; then
    dir=$(pg_config --bindir)
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && { echo "$dir"; return; }
  fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && { echo "$dir"; return; }
  done
  return 1
}

ensure_packages() {
  local missing=() optional=()
  command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
  pg_bindir >/dev/null || missing+=(postgresql)
  # Not services, but tests use them too: the dashboard's browser tests drive Debian's headless
  # Chromium through its chromedriver (tests/cloud/test_dashboard_browser.py), and qemu-user
  # emulates an x86 CPU without VNNI for the bundle gate's portability test
  # (tests/cloud/test_bundle_optimum.py). Without them those tests skip, saying why.
  command -v chromium >/dev/null 2>&1 || optional+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || optional+=(chromium-driver)
  if [ "$(uname -m)" = x86_64 ]; then
    command -v qemu-x86_64 >/dev/null 2>&1 || optional+=(qemu-user)
  fi
  [ ${#missing[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ] && return
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${missing[*]} ${optional[*]} with apt-get"
    apt-get update -qq >&2 || log "apt-get update failed; trying the install anyway"
    if [ ${#missing[@]} -gt 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
    if [ ${#optional[@]} -gt 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${optional[@]}" >&2 ||
        log "could not install ${optional[*]}: the tests that need them will skip"
    fi
    return
  fi
  if [ ${#optional[@]} -gt 0 ]; then
    log "no ${optional[*]}: the tests that need them will skip (sudo apt-get install -y ${optional[*]})"
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    die "missing ${missing[*]}: install them (Debian/Ubuntu: sudo apt-get install -y ${missing[*]}) or run this script as root"
  fi
}

# PostgreSQL refuses to run as root: use the postgres account then.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
  local bindir port
  bindir=$(pg_bindir)
  mkdir -p "$STATE/pg"
  [ "$(id -u)" -eq 0 ] && chown postgres "$STATE/pg"
  as_pg "$bindir/initdb" -D "$STATE/pg/data" -U postgres -A trust --no-sync -E UTF8 >/dev/null
  port=$(free_port)
  as_pg "$bindir/pg_ctl" -D "$STATE/pg/data" -w -l "$STATE/pg/log" \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $STATE/pg -c fsync=off -c full_page_writes=off" \
    start >/dev/null || die "PostgreSQL did not start: $(tail -n 20 "$STATE/pg/log")"
  echo "$bindir" > "$STATE/pg.bindir"
  echo "export FEDNANO_TEST_PG_URL=postgresql://postgres@127.0.0.1:$port/postgres" >> "$STATE/env"
}

dynsec_plugin() {
  ls /usr/lib/*/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so \
    2>/dev/null | head -n 1
}

mosquitto_conf() {
  local port=$1 files=$2
  cat <<EOF
listener $port 127.0.0.1
persistence false
max_packet_size $MAX_PACKET
max_queued_messages 10000
max_queued_bytes 1073741824
log_dest stderr
EOF
  if [ -n "$files" ]; then
    # the plugin rewrites its file on live changes: give it a copy in the state folder
    mkdir -p "$STATE/broker"
    cp "$files/dynamic-security.json" "$STATE/broker/dynamic-security.json"
    if [ "$(id -u)" -eq 0 ]; then chown -R mosquitto "$STATE/broker"; fi
    printf 'allow_anonymous false\nplugin %s\nplugin_opt_config_file %s\n' \
      "$(dynsec_plugin)" "$STATE/broker/dynamic-security.json"
  else
    echo "allow_anonymous true"
  fi
}

start_mosquitto() {
  local files=$1 port
  port=$(free_port)
  mosquitto_conf "$port" "$files" > "$STATE/mosquitto.conf"
  chmod 644 "$STATE/mosquitto.conf"   # as root, mosquitto drops to the mosquitto user
  setsid mosquitto -c "$STATE/mosquitto.conf" > "$STATE/mosquitto.log" 2>&1 < /dev/null &
  echo $! > "$STATE/mosquitto.pid"
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "export FEDNANO_TEST_MQTT_URL=mqtt://127.0.0.1:$port" >> "$STATE/env"
      return
    fi
    kill -0 "$(cat "$STATE/mosquitto.pid")" 2>/dev/null || break
    sleep 0.1
  done
  die "Mosquitto did not start: $(tail -n 20 "$STATE/mosquitto.log")"
}

# Whether the services recorded in this state folder still run (a killed run leaves its folder).
running() {
  local pid
  pid=$(cat "$1/mosquitto.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null && return 0
  [ -f "$1/pg.bindir" ] && as_pg "$(cat "$1/pg.bindir")/pg_ctl" -D "$1/pg/data" status >/dev/null 2>&1
}

start() {
  local files=""
  if [ "${1:-}" = "--broker-files" ]; then
    files=$(cd "${2:?--broker-files needs a folder}" && pwd)
    [ -r "$files/dynamic-security.json" ] || die "no dynamic-security.json in $files"
  fi
  if [ -e "$STATE/env" ]; then
    running "$STATE" && die "already started (state in $STATE): run '$0 stop' first"
    log "clearing stale state in $STATE (its services are no longer running)"
    stop >/dev/null 2>&1 || true
  fi
  ensure_packages
  mkdir -p "$STATE"
  chmod 755 "$STATE"
  : > "$STATE/env"
  trap 'log "start failed, cleaning up"; stop >/dev/null 2>&1 || true' ERR
  start_postgres
  start_mosquitto "$files"
  trap - ERR
  cat "$STATE/env"
}

stop() {
  if [ -f "$STATE/mosquitto.pid" ]; then
    kill "$(cat "$STATE/mosquitto.pid")" 2>/dev/null || true
  fi
  if [ -f "$STATE/pg.bindir" ]; then
    as_pg "$(cat "$STATE/pg.bindir")/pg_ctl" -D "$STATE/pg/data" -m fast stop >/dev/null 2>&1 || true
  fi
  rm -rf "$STATE"
  log "stopped; removed $STATE"
}

status() {
  [ -f "$STATE/env" ] || { log "not started"; return 1; }
  cat "$STATE/env"
  kill -0 "$(cat "$STATE/mosquitto.pid" 2>/dev/null)" 2>/dev/null && log "mosquitto: running" || log "mosquitto: down"
  as_pg "$(cat "$STATE/pg.bindir")/pg_ctl" -D "$STATE/pg/data" status >/dev/null 2>&1 \
    && log "postgresql: running" || log "postgresql: down"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [--broker-files DIR] | stop | status" >&2; exit 2 ;;
esac
