# syntax=docker/dockerfile:1
# The mmdiff runtime image: preprocessing (Ray workers), training (DeepSpeed ranks), serving (Ray Serve) and
# the team MLflow server all run from it (infra/k8s). No model weights inside: mount them (/models in the
# manifests) or point the configs at your own store.
#   docker build -t mmdiff:0.1.0 .
#
# torch 2.14.1's wheel (requirements/runtime.lock) brings its CUDA 13.0 user-space libraries as pip packages
# (nvidia-*-cu13, cuda-toolkit 13.0.x); the base only has to match that CUDA line and lets the NVIDIA
# container runtime mount a driver that supports it (>= 580). Python 3.11 comes from the deadsnakes PPA
# (Ubuntu 24.04 ships 3.12).
ARG CUDA_BASE=nvidia/cuda:13.0.2-base-ubuntu24.04

FROM ${CUDA_BASE} AS python
ENV DEBIAN_FRONTEND=noninteractive
# libgl1 and libglib2.0-0: opencv-python (an insightface dependency) loads them at import; wget: KubeRay's
# health probes of Ray pods call it
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgl1 libglib2.0-0 wget \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

FROM python AS build
# compilers for the sdists in the lock (deepspeed, groundingdino-py); they stay out of the runtime image
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv
# The runtime lock first, in its own layer: it changes far less often than the code. It is the runtime set
# only (`mmdiff[runtime]`: no test or lint tools, which live in requirements/dev.lock), and every file is
# checked against its hash. deepspeed's and groundingdino-py's setup.py import torch, so torch and the build
# tools go in before the rest (awk copies their entries, hash lines included), which is then built against
# them without build isolation. --no-deps: the lock is the complete set.
COPY requirements/runtime.lock /tmp/runtime.lock
RUN awk '/^(torch|setuptools|wheel)==/ {entry = 1} entry {print} !/\\$/ {entry = 0}' /tmp/runtime.lock > /tmp/first.txt \
 && /opt/venv/bin/pip install --no-deps --require-hashes -r /tmp/first.txt \
 && /opt/venv/bin/pip install --no-deps --require-hashes --no-build-isolation -r /tmp/runtime.lock
COPY . /src
RUN /opt/venv/bin/pip wheel --no-deps --no-build-isolation -w /dist /src \
 && /opt/venv/bin/pip install --no-deps /dist/mmdiff-*.whl \
 && /opt/venv/bin/pip check

FROM python
RUN useradd --create-home --uid 1000 --shell /bin/bash mmdiff
COPY --from=build /opt/venv /opt/venv
# Configs and the server scripts the jobs name by relative path (configs/..., infra/mlflow/...). Only
# these: the code comes from the installed wheel, never from a source tree in the working directory.
WORKDIR /opt/mmdiff
COPY configs configs
COPY infra/mlflow infra/mlflow
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# numeric, so Kubernetes can enforce runAsNonRoot
USER 1000:1000
CMD ["mmdiff-train", "--help"]
