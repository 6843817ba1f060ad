# syntax=docker/dockerfile:1.7
#
# Images for the embedding service. Three targets, no model inside any of them (bundles live on a
# volume, see docs/deploy.md):
#
#   docker build --target cpu    -t embedding-service:0.1.0-cpu .     # slim, onnxruntime (CPU)
#   docker build --target gpu    -t embedding-service:0.1.0-gpu .     # CUDA + cuDNN runtime, onnxruntime-gpu, TensorRT libs
#   docker build --target export -t embedding-service:0.1.0-export .  # embed-export: torch + transformers (CPU)
#
# The serving images install exactly one ONNX Runtime: the `cpu` extra (onnxruntime) or the `gpu`
# extra (onnxruntime-gpu), never both: they overwrite each other's files. The export image follows
# scripts/bootstrap.sh: torch pinned and installed first, then the cpu,export,assets extras.
#
# Every image runs as uid/gid 10001, writes nothing outside /tmp (mount an emptyDir there with a
# read-only root filesystem) and starts `embed-serve` (or `embed-export`). Settings come from
# EMBED_* variables or flags (service/settings.py). This file is not built in CI (no container
# engine there); tests/chart/test_dockerfile.py checks what can be checked without building it.
#
# Bases are pinned by tag; for production builds pin digests too (--build-arg PYTHON_BASE=python:3.11.13-slim-bookworm@sha256:...).

ARG PYTHON_BASE=python:3.11.13-slim-bookworm
# onnxruntime-gpu 1.22 wheels are built for CUDA 12.x and cuDNN 9.
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# The GPU image pins ONNX Runtime and TensorRT as a pair: the TensorRT EP loads the TensorRT
# version it was built against (see ONNX Runtime's TensorRT EP requirements table). Engines are
# cached per TensorRT version: set the chart's trtCache.tensorrtVersion to TENSORRT_VERSION.
ARG ORT_GPU_VERSION=1.22.0
ARG TENSORRT_VERSION=10.9.0.34

# ------------------------------------------------------------------------------------------------
# CPU: build a virtualenv with the package and the cpu extra, then copy it into a clean base.
FROM ${PYTHON_BASE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bundle ./bundle
COPY export ./export
COPY service ./service
COPY proto ./proto
RUN /opt/venv/bin/pip install ".[cpu,otel]"

FROM ${PYTHON_BASE} AS runtime-base
RUN groupadd --gid 10001 embed \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin embed
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    EMBED_HOST=0.0.0.0
WORKDIR /tmp

FROM runtime-base AS export-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=cpu-build /src /src
WORKDIR /src
# torch first and pinned, as scripts/bootstrap.sh does: an unpinned torch is a multi-GB CUDA build.
RUN pip install torch==2.13.0 \
 && pip install ".[cpu,export,assets]"

# ------------------------------------------------------------------------------------------------
# GPU: CUDA + cuDNN runtime base, system Python in a virtualenv, onnxruntime-gpu + TensorRT libs.
FROM ${CUDA_BASE} AS gpu-base
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 embed \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin embed

FROM gpu-base AS gpu-build
ARG ORT_GPU_VERSION
ARG TENSORRT_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bundle ./bundle
COPY export ./export
COPY service ./service
COPY proto ./proto
RUN /opt/venv/bin/pip install ".[gpu,otel]" "onnxruntime-gpu==${ORT_GPU_VERSION}" "tensorrt-cu12-libs==${TENSORRT_VERSION}" \
 && ln -s "$(/opt/venv/bin/python -c 'import tensorrt_libs, os; print(os.path.dirname(tensorrt_libs.__file__))')" /opt/tensorrt_libs

FROM gpu-base AS gpu
ARG TENSORRT_VERSION
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=gpu-build /opt/tensorrt_libs /opt/tensorrt_libs
COPY --chmod=0555 helm/embedding-service/files/grpc-health-check.py /usr/local/bin/embed-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/tensorrt_libs:/usr/local/cuda/lib64 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    EMBED_HOST=0.0.0.0
LABEL org.opencontainers.image.title="embedding-service (gpu)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.embedding-service.tensorrt-version="${TENSORRT_VERSION}"
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s CMD ["embed-healthcheck", "--addr=127.0.0.1:50051"]
ENTRYPOINT ["embed-serve"]

# ------------------------------------------------------------------------------------------------
FROM runtime-base AS export
COPY --from=export-build /opt/venv /opt/venv
LABEL org.opencontainers.image.title="embedding-service (export)" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
ENTRYPOINT ["embed-export"]

# ------------------------------------------------------------------------------------------------
# Last stage = default target: the slim CPU image.
FROM runtime-base AS cpu
COPY --from=cpu-build /opt/venv /opt/venv
COPY --chmod=0555 helm/embedding-service/files/grpc-health-check.py /usr/local/bin/embed-healthcheck
LABEL org.opencontainers.image.title="embedding-service (cpu)" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
EXPOSE 50051 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s CMD ["embed-healthcheck", "--addr=127.0.0.1:50051"]
ENTRYPOINT ["embed-serve"]
