#!/bin/sh
# The broker container's entrypoint: copy the TLS files from the compose secrets (bind mounts
# that keep the host's owner and mode) to /mosquitto/certs, readable by the mosquitto user the
# broker drops to, then hand over to the image's own entrypoint.
set -eu
certs=/mosquitto/certs
mkdir -p "$certs"
cp /run/secrets/broker_ca_cert "$certs/ca.crt"
cp /run/secrets/broker_tls_cert "$certs/server.crt"
cp /run/secrets/broker_tls_key "$certs/server.key"
chown -R mosquitto:mosquitto "$certs"
chmod 0700 "$certs"
chmod 0644 "$certs/ca.crt" "$certs/server.crt"
chmod 0600 "$certs/server.key"
exec /docker-entrypoint.sh "$@"
