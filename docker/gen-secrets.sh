#!/usr/bin/env bash
# The docker-compose stack's secrets and the broker's TLS certificates, created once.
#
#   docker/gen-secrets.sh [OUT]          OUT defaults to docker/ (both folders are git-ignored)
#
# OUT/secrets/db_password, secret_key, broker_password: 32 random bytes, hex.
# OUT/certs/ca.key, ca.crt: a private CA (10 years); give ca.crt to devices (broker.ca_file).
#   It is also the device CA: the api and init services sign X.509 devices' certificates with
#   ca.key (compose secret broker_ca_key), and the broker's certificate listener (8884) trusts
#   what ca.crt signed.
# OUT/certs/server.key, server.crt: the broker's certificate (825 days) for the names
#   mosquitto, localhost, 127.0.0.1 and those in FEDNANO_BROKER_HOSTNAMES (space-separated
#   DNS names or IP addresses devices use, e.g. "broker.example.com 203.0.113.7").
# Existing files are kept (delete one to regenerate it; delete server.crt after changing the
# names; a new CA invalidates every device certificate the old one signed). The folders are
# 0700; the secret files and ca.key are 0644 inside them because compose mounts a secret with
# the host file's owner and mode, and the containers read it as their own non-root users
# (ca.key: the cloud image's user, in api and init only). server.key stays 0600: the broker's
# start.sh copies it as root. Rerunning the script fixes the modes of files made by an older
# version.
set -euo pipefail

out=${1:-$(dirname "$0")}
secrets=$out/secrets
certs=$out/certs
umask 077
mkdir -p "$secrets" "$certs"
chmod 0700 "$secrets" "$certs"

for name in db_password secret_key broker_password; do
  [ -s "$secrets/$name" ] || openssl rand -hex 32 > "$secrets/$name"
  chmod 0644 "$secrets/$name"
done

if [ ! -s "$certs/ca.crt" ] || [ ! -s "$certs/ca.key" ]; then
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -days 3650 -subj "/CN=FedNano broker CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$certs/ca.key" -out "$certs/ca.crt" 2>/dev/null
  rm -f "$certs/server.crt"
fi

if [ ! -s "$certs/server.crt" ] || [ ! -s "$certs/server.key" ]; then
  san="DNS:mosquitto,DNS:localhost,IP:127.0.0.1"
  for host in ${FEDNANO_BROKER_HOSTNAMES:-}; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
  done
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -subj "/CN=mosquitto" -keyout "$certs/server.key" -out "$certs/server.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' \
    "$san" > "$certs/server.ext"
  openssl x509 -req -sha256 -days 825 -in "$certs/server.csr" -CA "$certs/ca.crt" \
    -CAkey "$certs/ca.key" -CAcreateserial -extfile "$certs/server.ext" \
    -out "$certs/server.crt" 2>/dev/null
  rm -f "$certs/server.csr" "$certs/server.ext"
fi
chmod 0644 "$certs/ca.crt" "$certs/server.crt" "$certs/ca.key"
chmod 0600 "$certs/server.key"
echo "secrets in $secrets, certificates in $certs (CA for devices: $certs/ca.crt)"
