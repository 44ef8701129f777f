# The FedNano edge image: the device agent (fednano-edge) on a CPU, as the simulated devices of
# docker-compose.yml run it. No cloud code and none of the cloud's dependencies (transformers,
# FastAPI, SQLAlchemy, ...): only shared/ and edge/ with the edge and data extras; the build
# fails if a cloud dependency gets in anyway.
#
#   docker build -f docker/edge.Dockerfile -t fednano-edge .
#   docker run --rm -v /etc/fednano:/etc/fednano fednano-edge run --config /etc/fednano/device.yaml
#
# A Jetson variant (not built here) would change:
# - FROM an L4T image matching the device's JetPack (JetPack 6.2.x = L4T 36.4.x, Ubuntu 22.04,
#   Python 3.10, CUDA 12.6, TensorRT 10.3), e.g. nvcr.io/nvidia/l4t-jetpack:r36.4.0, run with
#   the NVIDIA container runtime (--runtime nvidia);
# - torch from NVIDIA's Jetson wheel for that JetPack instead of the CPU index below;
# - onnxruntime from NVIDIA's Jetson wheels (onnxruntime-gpu with the TensorRT and CUDA
#   providers), installed before the project with the PyPI onnxruntime left out: PyPI has no
#   aarch64 GPU build;
# - a jetson-* profile from firmware_configs/ (providers TensorRT > CUDA > CPU, power mode by
#   name, resolved at run time) and a volume for the TensorRT engine cache;
# - shared/ and edge/ stay Python 3.10 compatible for exactly this reason.

# PYTHON_IMAGE: the official image by default; scripts/build-images.sh --offline passes an image
# made from Debian packages (docker/offline/python.Dockerfile), for sites without a registry.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# WHEELHOUSE=/wheelhouse: pip takes every package from docker/wheelhouse/ (filled by
# scripts/build-images.sh --offline) and asks no index at all (the venv's own pip.conf, removed
# again before the final stage). Empty (the default): PyPI, and torch from its CPU wheel index.
ARG WHEELHOUSE=
COPY docker/wheelhouse/ /wheelhouse/
RUN if [ -n "$WHEELHOUSE" ]; then \
      printf '[global]\nno-index = true\nfind-links = %s\n' "$WHEELHOUSE" > /opt/venv/pip.conf; \
    fi
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0
# Installed editable from /opt/fednano/src, copied as is into the final stage (as in the cloud
# image: files next to the modules, such as firmware_configs/, stay where the code looks).
WORKDIR /opt/fednano/src
COPY pyproject.toml README.md ./
# The dependencies first, in a layer that changes only with pyproject.toml (empty stand-ins
# for the project's packages, uninstalled right after). easy-vqa: the simulated devices'
# local data (shards of it); --no-deps as in scripts/setup.sh.
RUN mkdir shared edge \
 && pip install ".[edge,data]" \
 && pip install --no-deps easy-vqa==1.0 \
 && pip uninstall -y fednano && rm -rf shared edge build ./*.egg-info
COPY shared/ shared/
COPY edge/ edge/
COPY firmware_configs/ firmware_configs/
RUN pip install --no-deps -e ".[edge,data]" \
 && rm /opt/venv/bin/fednano /opt/venv/pip.conf -f
# (the distribution declares the `fednano` cloud command too; without cloud/ it cannot run)
RUN python -c "import importlib.util as u, sys; \
bad = [m for m in ('transformers', 'fastapi', 'sqlalchemy', 'alembic', 'uvicorn', 'psycopg', \
'gguf', 'accelerate', 'cloud', 'fednano') if u.find_spec(m)]; \
sys.exit(f'cloud dependencies in the edge image: {bad}' if bad else 0)"

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH \
    TOKENIZERS_PARALLELISM=false
# uid/gid 10001 as in the cloud image: both write the shared fleet volume.
RUN groupadd --gid 10001 fednano \
 && useradd --uid 10001 --gid fednano --home-dir /var/lib/fednano --no-create-home \
      --shell /usr/sbin/nologin fednano \
 && install -d -o fednano -g fednano /var/lib/fednano /var/lib/fednano-fleet
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/fednano/src /opt/fednano/src
COPY docker/edge_sim.py docker/healthcheck.py /opt/fednano/docker/
# Every shipped profile must validate in the image (no torch import needed for this).
RUN fednano-edge profiles >/dev/null
USER fednano
WORKDIR /var/lib/fednano
ENTRYPOINT ["fednano-edge"]
CMD ["--help"]
