#!/usr/bin/env bash
# How much CPU a container gets beside busy host processes (cgroup v1, dockerd's cgroupfs driver,
# as root): one host process and 3 containers run the same 1-thread matmul loop for 30 s at the
# same time and print how many matmuls per second each did, with Docker's parent cgroup at its
# default weight (cpu.shares 1024: all containers together weigh one host process) and at 3072
# (one process each), alternating, twice. docs/deploy.md has the result on a shared 2-core host.
#
#   scripts/docker-cpu-fairness.sh [IMAGE]     IMAGE with python and torch (fednano-cloud:dev)
#
# The host side runs `python3` with torch: activate the project's venv first.
set -euo pipefail
image=${1:-fednano-cloud:${FEDNANO_TAG:-dev}}
shares=/sys/fs/cgroup/cpu/docker/cpu.shares
[ -w "$shares" ] || { echo "docker-cpu-fairness: $shares is not writable (root, cgroup v1," \
  "cgroupfs driver, a container started once)" >&2; exit 1; }
python3 -c "import torch" 2>/dev/null || { echo "docker-cpu-fairness: python3 has no torch"\
  "(activate the project's venv)" >&2; exit 1; }
before=$(cat "$shares")
trap 'echo "$before" > "$shares"' EXIT
code='import sys, time, torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
n, t = 0, time.time()
while time.time() - t < 30:
    a @ a
    n += 1
print(sys.argv[1], round(n / 30))'
for rep in 1 2; do
  for weight in 1024 3072; do
    echo "$weight" > "$shares"
    echo "rep $rep: docker cpu.shares $weight, load $(cut -d' ' -f1 /proc/loadavg)"
    for c in 1 2 3; do
      docker run --rm --network none --entrypoint python "$image" -c "$code" "container$c" &
    done
    sleep 3  # the containers' start
    python3 -c "$code" host &
    wait
  done
done
