# syntax=docker/dockerfile:1
# imagic-batch: one image for the Prefect worker, the bulk-edit parent and the GPU edit-chunk runs.
#   docker build -t REGISTRY/imagic-batch:0.1.0 .
# The CUDA runtime comes from the base image; torch is the matching CUDA build from PyTorch's index.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /opt/imagic
COPY pyproject.toml README.md ./
COPY imagic ./imagic
COPY flows ./flows
# Not editable: the runtime stage copies the venv alone, code included.
RUN pip install "./[cuda,k8s]"

FROM ${CUDA_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin imagic \
    && mkdir -p /models && chown imagic:imagic /models
COPY --from=build /opt/venv /opt/venv
# Deployment entrypoints (prefect.yaml: flows/…) resolve relative to this directory.
WORKDIR /opt/imagic
COPY --chown=imagic:imagic flows ./flows
COPY --chown=imagic:imagic prefect.yaml ./
# Model weights live on a mounted volume (k8s: the model-cache PVC at /models), never in the image.
# No credentials here: S3 and Prefect settings arrive as env from a Secret and a ConfigMap.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models/huggingface \
    IMAGIC_CACHE=/models/imagic \
    HF_HUB_DISABLE_TELEMETRY=1
USER 10001
CMD ["imagic", "--help"]
