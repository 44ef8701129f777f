#!/usr/bin/env bash
# The docs/results.md comparison: FedNano vs FedAvg vs FedProx vs local vs centralized.
#   bash benchmarks/comparison.sh [ALPHAS] [SEEDS] [CLIENTS] [JOBS]
#   e.g. bash benchmarks/comparison.sh "0.1 0.5 1.0" "0 1" 5 2
# Environment: METHODS (default all five), EXTRA (more `fednano simulate` options) with TAG (a
# suffix for the run folders of such a variant), OUT (default runs/results), LIST=1 (print the
# commands still to run instead of running them, e.g. to feed one `xargs -P` on a big machine).
# On a GPU machine: EXTRA="--llm-device cuda" and more JOBS (the devices' side stays on the CPU).
# Each run is `fednano simulate` with the settings below and --threads 1; JOBS runs go side by
# side (two 1-thread processes beat one 2-thread process on 2 cores). Finished runs (a
# report.json exists) are skipped, so the script resumes after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
alphas=${1:-"0.1 0.5 1.0"}
seeds=${2:-"0 1"}
clients=${3:-5}
jobs=${4:-2}
methods=${METHODS:-"fednano fedavg fedprox local centralized"}
out=${OUT:-runs/results}
settings="--rounds 3 --steps 8 --batch-size 16 --lr 2e-3 --fisher-samples 32 \
--eval-questions 1000 --round-eval-questions 0 --partition question --holdout-by question \
--threads 1 ${EXTRA:-}"
for alpha in $alphas; do for seed in $seeds; do for m in $methods; do
  dir="$out/k$clients/a$alpha/$m${TAG:-}/s$seed"
  [ -f "$dir/report.json" ] && continue
  echo "fednano simulate --strategy $m --devices $clients --alpha $alpha --seed $seed $settings --out $dir"
done; done; done > "${TMPDIR:-/tmp}/comparison-$$.txt"
if [ -n "${LIST:-}" ]; then cat "${TMPDIR:-/tmp}/comparison-$$.txt"; rm -f "${TMPDIR:-/tmp}/comparison-$$.txt"; exit 0; fi
xargs -P "$jobs" -I{} bash -c '{} > /dev/null 2>&1 || echo "FAILED: {}"' < "${TMPDIR:-/tmp}/comparison-$$.txt"
rm -f "${TMPDIR:-/tmp}/comparison-$$.txt"
fednano compare "$out/k$clients"
