# Offline base for the cloud and edge images: Debian bookworm's Python 3.11 (the interpreter
# the official python:3.11-slim-bookworm image would give), from Debian packages only.
#
#   docker build -f docker/offline/python.Dockerfile --build-arg DEBIAN_IMAGE=fednano-debian:bookworm \
#     -t fednano-python:3.11-bookworm docker/offline
#
# DEBIAN_IMAGE is made without any registry by scripts/build-images.sh --offline (debootstrap
# + docker import). The packages come from the Debian mirror apt is configured for (a local
# mirror on a site without internet). python-is-python3 gives `python`, as the official image.
ARG DEBIAN_IMAGE=fednano-debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 passwd \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
