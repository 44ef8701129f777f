#!/bin/sh
# Entrypoint of the cloud image: secrets from files, then the command.
#
# NAME_FILE=/run/secrets/x sets NAME to the file's contents (trailing newlines dropped) for the
# variables below, the convention of the postgres image, so secrets never sit in the compose
# file or in `docker inspect`. PGPASSWORD is libpq's: FEDNANO_DATABASE_URL carries no password.
# `fednano cloud llm-worker` without --worker-id gets llm-worker-<container hostname>: every
# replica needs its own MQTT client id (a second client with the same id disconnects the first).
set -eu

SECRET_VARS="FEDNANO_SECRET_KEY FEDNANO_BROKER_PASSWORD PGPASSWORD"

file_env() {
  name=$1
  eval "file=\${${name}_FILE:-}"
  [ -n "$file" ] || return 0
  eval "value=\${${name}:-}"
  if [ -n "$value" ]; then
    echo "cloud-entrypoint: both $name and ${name}_FILE are set; set only one" >&2
    exit 2
  fi
  if [ ! -r "$file" ]; then
    echo "cloud-entrypoint: ${name}_FILE=$file is missing or unreadable by uid $(id -u)" >&2
    exit 2
  fi
  value=$(cat "$file")
  export "$name=$value"
  unset "${name}_FILE"
}

for name in $SECRET_VARS; do
  file_env "$name"
done

if [ "$#" -ge 3 ] && [ "$1 $2 $3" = "fednano cloud llm-worker" ]; then
  case " $* " in
    *" --worker-id "* | *" --worker-id="*) ;;
    *) set -- "$@" --worker-id "llm-worker-$(cat /proc/sys/kernel/hostname)" ;;
  esac
fi

exec "$@"
