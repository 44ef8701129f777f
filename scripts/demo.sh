#!/usr/bin/env bash
# The main job: the real system on this machine. Builds the frozen base once if missing (real
# SmolLM2 + EfficientNet-Lite0 weights) and exports the device bundle, then `fednano demo`:
# SQLite, a private Mosquitto on a free loopback port (installed with apt-get when missing and
# running as root), the all-in-one cloud (API + coordinator + LLM worker) and 3 device
# processes training FedNano adapters on easy-VQA for 3 rounds. Prints the results, the API
# and dashboard URL and an operator token. Extra arguments go to `fednano demo` (--serve keeps
# the cloud up afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec fednano demo "$@"
