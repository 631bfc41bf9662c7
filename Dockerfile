# syntax=docker/dockerfile:1
# monet-cyclegan: the photo->Monet service (and training) on CUDA 12.8, also runnable without a GPU.
#
# CUDA/torch pair: the CUDA 12.8 runtime base with PyTorch's cu128 wheels. cu128 is the first build with
# kernels for every current data-centre and consumer GPU (Turing, Ampere, Ada, Hopper, Blackwell), and CUDA
# 12.x minor-version compatibility lets it run on any driver >= 525. The same wheels run on CPU-only hosts.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- build: a virtual environment with torch (cu128) and the project's dependencies -------------------
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.8.0 torchvision==0.23.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY app ./app
COPY training ./training
# the project itself, from the build context; its dependency ranges live in pyproject.toml
# hadolint ignore=DL3013
RUN pip install ".[openvino]"

# ---- runtime: python, the venv, the default weights; no compilers, no caches ---------------------------
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY weights /srv/monet/weights
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MONET_WEIGHTS=/srv/monet/weights/photo2monet.safetensors \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GRADIO_TEMP_DIR=/tmp/gradio \
    HOME=/tmp
WORKDIR /srv/monet
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]
CMD ["python", "-m", "app", "--host", "0.0.0.0"]
