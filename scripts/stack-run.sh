#!/usr/bin/env bash
# The docker-compose stack run for real: build every image, start the stack, run rounds through
# the REST API, docker kill an LLM worker and the coordinator mid-round, check that the round
# completes and that nothing acknowledged was lost (SQL), that Prometheus scraped every service,
# that the broker's TLS listener takes a device's credentials, and that an X.509 device added
# through the API gets in on the certificate listener and is refused once revoked; then tear it
# all down.
#
#   scripts/stack-run.sh --offline                 # images without a registry (as run here)
#   scripts/stack-run.sh --offline --seed-base ~/.cache/fednano   # skip the base build in init
#   scripts/stack-run.sh --help                    # every option
#
# Needs a running Docker engine and Compose (v2 `docker compose`, or Debian's docker-compose).
# The output ends with a summary: each step's time and what was checked (docs/deploy.md).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/stack_run.py "$@"
