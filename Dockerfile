# One CUDA image for the three jobs. Build: make image (needs a Docker engine).
# Runtime: tini as PID 1 (forwards SIGTERM so training publishes its checkpoint), non-root,
# read-only root filesystem friendly (HOME and caches on writable emptyDirs in the Job).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# vllm 0.33 pins torch 2.14.0: the image's torch must be the one vllm accepts, or pip replaces it.
# A CPU image without vllm (the kind e2e workflow): --build-arg EXTRAS= --build-arg
# TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch==2.14.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cu128"
ARG EXTRAS="vllm"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/loraforge \
    HF_HOME=/cache/hf \
    LORAFORGE_CACHE=/cache/loraforge

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --uid 10001 --create-home --home-dir /home/loraforge loraforge \
 && mkdir -p /cache /work && chown loraforge:loraforge /cache /work

# The CUDA wheel of torch first, from its index; then the package (whose torch bound it meets).
# Versions are pinned by TORCH_SPEC and by pyproject.toml's bounds, which hadolint cannot see.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# TORCH_SPEC again: pip must resolve the extras against the torch installed above, not swap it
# hadolint ignore=DL3013
RUN pip install ".${EXTRAS:+[${EXTRAS}]}" "${TORCH_SPEC}" && rm -rf /src

WORKDIR /work
USER 10001:10001
# Batch jobs, not services: Kubernetes ignores HEALTHCHECK, and a job's liveness is its exit
# code (design.md table) plus activeDeadlineSeconds. NONE also disables any inherited check.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["loraforge", "info"]
