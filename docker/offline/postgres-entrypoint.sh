#!/bin/sh
# Entrypoint of the offline PostgreSQL image: the subset of the official postgres image's
# entrypoint that docker-compose.yml uses. On the first start (empty PGDATA): initdb with
# POSTGRES_USER as the superuser and its password (POSTGRES_PASSWORD or _FILE), the database
# POSTGRES_DB, listening on every interface with scram-sha-256 for network clients. Then the
# server runs in the foreground as postgres.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
bin=/usr/lib/postgresql/15/bin  # absolute: runuser need not keep PATH
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}

password() {
  if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    cat "$POSTGRES_PASSWORD_FILE"
  else
    printf '%s' "${POSTGRES_PASSWORD:-}"
  fi
}

if [ "$(id -u)" = "0" ]; then
  install -d -o postgres -g postgres -m 0700 "$PGDATA"
  install -d -o postgres -g postgres /run/postgresql
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    secret=$(password)
    if [ -z "$secret" ]; then
      echo "postgres-entrypoint: set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE" >&2
      exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$secret" > "$pwfile"
    chown postgres "$pwfile"
    runuser -u postgres -- "$bin/initdb" -D "$PGDATA" -U "$user" --pwfile="$pwfile" \
      --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$db" != "postgres" ]; then
      runuser -u postgres -- "$bin/pg_ctl" -D "$PGDATA" -w -o "-c listen_addresses=''" start \
        >/dev/null
      runuser -u postgres -- "$bin/createdb" -U "$user" "$db"
      runuser -u postgres -- "$bin/pg_ctl" -D "$PGDATA" -w -m fast stop >/dev/null
    fi
    echo "postgres-entrypoint: initialised $PGDATA (user $user, database $db)"
  fi
  if [ "$1" = "postgres" ]; then
    shift
    exec runuser -u postgres -- "$bin/postgres" -D "$PGDATA" "$@"
  fi
fi
exec "$@"
