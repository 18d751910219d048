# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target serving  -t genserve:serving  .   # default target (last stage)
#   docker build --target training -t genserve:training .
#
# serving:  onnxruntime-gpu on a CUDA + cuDNN runtime base, no torch. Runs `genserve serve`.
# training: the same base plus the `training` extra (torch==2.13.0 with its bundled CUDA libraries).
#           Entrypoint `genserve train`; `torchrun` is on PATH for multi-GPU data parallelism
#           (override the entrypoint: `docker run --entrypoint torchrun ...`, or `command:` in k8s).
#
# The CUDA major of the base image must match the one onnxruntime-gpu was built for: the
# onnxruntime-gpu wheels on PyPI (1.31.x) are built with CUDA 13.0 and cuDNN 9, so the base is
# CUDA 13 + cuDNN 9. The build checks this (see "CUDA major" below) and fails when they drift.
# The host needs an NVIDIA driver that supports CUDA 13 (>= 580). On a machine without a GPU the
# serving image still works: onnxruntime falls back to the CPU execution provider.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04

# ---------------------------------------------------------------------------------------------
# base: Python 3.11 (Ubuntu 22.04's python3.11) and the unprivileged user; shared by all stages.
FROM ${CUDA_IMAGE} AS base

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11=3.11.* \
        python3.11-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 genserve \
    && useradd --system --uid 10001 --gid genserve --create-home --home-dir /home/genserve \
        --shell /usr/sbin/nologin genserve \
    && mkdir -p /models \
    && chown genserve:genserve /models

# ---------------------------------------------------------------------------------------------
# build-serving: a virtual environment at /opt/venv with the package and its serving
# dependencies only (pyproject's `dependencies`: no torch).
FROM base AS build-serving

RUN python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip==26.3

WORKDIR /src
# .dockerignore admits only what `pip install .` needs (pyproject.toml, README.md, the packages).
COPY . .
RUN pip install --no-cache-dir . \
    && python -c "import os, onnxruntime.capi.build_and_package_info as ort; \
built = ort.cuda_version.split('.')[0]; base = os.environ['CUDA_VERSION'].split('.')[0]; \
assert built == base, f'onnxruntime-gpu is built for CUDA {built}, base image is CUDA {base}'" \
    && ! python -c "import torch" 2>/dev/null

# ---------------------------------------------------------------------------------------------
# build-training: the serving environment plus the `training` extra (torch==2.13.0, onnx, ...).
FROM build-serving AS build-training

# "/src[training]" rather than ".[training]": the same install, in a form hadolint reads as a
# local path (torch is pinned in pyproject.toml, where hadolint cannot see it).
RUN pip install --no-cache-dir "/src[training]" \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && command -v torchrun

# ---------------------------------------------------------------------------------------------
# training: `genserve train FAMILY --data DATASET --out REPO --name NAME`, or torchrun.
FROM base AS training

COPY --from=build-training /opt/venv /opt/venv
WORKDIR /home/genserve
USER 10001:10001
ENTRYPOINT ["genserve", "train"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# serving (default target): `genserve serve --repo /models --host 0.0.0.0`.
# Settings not given as flags come from GENSERVE_* environment variables (GENSERVE_PORT, ...).
FROM base AS serving

COPY --from=build-serving /opt/venv /opt/venv
WORKDIR /home/genserve
USER 10001:10001

# gRPC (domain API, Open Inference Protocol v2, grpc.health.v1, reflection) and Prometheus.
EXPOSE 8500 9100

# Healthy only while grpc.health.v1 answers SERVING: NOT_SERVING until the models are loaded
# and while draining. Uses grpcio-health-checking, already a serving dependency.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('GENSERVE_PORT', '8500')); reply = g.HealthStub(channel).Check(h.HealthCheckRequest(service=''), timeout=4); sys.exit(0 if reply.status == h.HealthCheckResponse.SERVING else 1)"]

ENTRYPOINT ["genserve"]
CMD ["serve", "--repo", "/models", "--host", "0.0.0.0"]
