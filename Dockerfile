# syntax=docker/dockerfile:1
#
# IMDN super-resolution service on one NVIDIA GPU.
#
# The PyTorch CUDA wheel carries its own CUDA user-space libraries (cuDNN, cuBLAS...),
# so the base is NVIDIA's small "base" flavour of the same CUDA release (13.0.3, what
# torch 2.13.0+cu130 is built against): its libraries are not duplicated, and it sets
# what the NVIDIA Container Toolkit needs. CUDA 13.0 needs a host driver >= 580; for an
# older driver build with, e.g.:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 --build-arg TORCH_CUDA=cu128
# (compose: IMDN_CUDA_IMAGE=... IMDN_TORCH_CUDA=... docker compose up -d --build)
#
# Build:  docker build -t imdn-serve .
#         docker build --build-arg FETCH_WEIGHTS=0 -t imdn-serve .   (mount weights instead)

ARG CUDA_IMAGE=nvidia/cuda:13.0.3-base-ubuntu24.04

# ---------------------------------------------------------------- build stage
FROM ${CUDA_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
# 1: fetch the official checkpoints now (sha256-verified); 0: mount them at run time.
ARG FETCH_WEIGHTS=1

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

# The base image's tag pins the distribution; exact apt versions would break the build
# at every Ubuntu security update, so they are left to it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# Dependencies first, so that a change to the source reuses these layers.
RUN pip install --no-cache-dir \
        --extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}"

WORKDIR /src
COPY pyproject.toml README.md ./
# the dependencies, the `gpu` extra (NVML, for the utilisation gauge) and the `video`
# extra (PyAV: POST /v1/superres/video)
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu'] + p['optional-dependencies']['video']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && python3 -c "import torch; assert torch.version.cuda, 'torch lost its CUDA build'"

COPY models ./models
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && mkdir -p /opt/imdn/weights \
    && if [ "${FETCH_WEIGHTS}" = "1" ]; then imdn fetch-weights --dir /opt/imdn/weights; fi

# -------------------------------------------------------------- runtime stage
FROM ${CUDA_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin imdn

COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=imdn:imdn /opt/imdn/weights /opt/imdn/weights

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMDN_WEIGHTS_DIR=/opt/imdn/weights \
    IMDN_HOST=0.0.0.0 \
    IMDN_PORT=8000
# Fewer glibc arenas: a smaller, steadier resident size (docs/reliability.md).
ENV MALLOC_ARENA_MAX=2

USER 10001:10001
WORKDIR /opt/imdn
EXPOSE 8000

# The server opens its port only once every model is loaded and warm (uvicorn runs the
# lifespan first): /healthz and /readyz refuse connections until then and answer 200
# together; start-period covers the warm-up. /healthz turns 503 when one device call
# has not returned for IMDN_LIVENESS_TIMEOUT_S (a wedged worker). On SIGTERM the
# server drains in-flight requests and exits 0.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('IMDN_PORT', '8000'), timeout=4)"]

# One process, one uvicorn worker, one GPU: scale out with more containers.
CMD ["imdn", "serve"]
