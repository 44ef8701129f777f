#!/usr/bin/env bash
# The in-process comparison (no broker, no cloud processes): build the frozen base once (real
# SmolLM2 + EfficientNet-Lite0 weights), then a small federated run on easy-VQA — FedNano
# (Fisher merge) next to FedAvg — and print both. `make demo` runs the real system instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
common=(--devices 3 --alpha 0.5 --rounds 2 --steps 15 --max-samples 600
        --eval-questions 300 --round-eval-questions 0 "$@")
fednano simulate --strategy fednano --out runs/demo/fednano "${common[@]}"
fednano simulate --strategy fedavg --out runs/demo/fedavg "${common[@]}"
python -m fednano.compare runs/demo/fednano runs/demo/fedavg
