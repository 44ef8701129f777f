#!/bin/sh
# The broker container's entrypoint: copy the TLS files from the compose secrets (bind mounts
# that keep the host's owner and mode) to /mosquitto/certs, readable by the mosquitto user the
# broker drops to, put the accounts file in place, then hand over to the image's entrypoint.
# ca.crt is the cafile of both TLS listeners: on 8884 it decides which device certificates get
# in. The CA's key is no secret of the broker's (only api and init sign certificates).
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
# The broker's accounts: the registry's file (written by `init` from the database) replaces the
# broker's own copy when it is newer; otherwise the broker's copy, with its live changes, stays.
generated=/fednano/broker/dynamic-security.json
live=/mosquitto/data/dynamic-security.json
mkdir -p /mosquitto/data
if [ -f "$generated" ] && { [ ! -f "$live" ] || [ "$generated" -nt "$live" ]; }; then
  cp "$generated" "$live"
fi
if [ -f "$live" ]; then
  chown mosquitto:mosquitto "$live"
  chmod 0600 "$live"
fi
exec /docker-entrypoint.sh "$@"
