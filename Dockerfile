# syntax=docker/dockerfile:1
# Goose: an OpenAI-compatible server for RWKV-7, with the default model (models/rwkv7-austen) baked in.
#
#   CPU image (default):  docker build -t goose:cpu .
#   CUDA image:           docker build -t goose:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
#                           --build-arg EXTRAS=fast,cuda --build-arg STRATEGY="cuda fp16" .
#   Run:                  docker run -p 8000:8000 goose:cpu          (then http://localhost:8000/v1)
#
# The pip commands below are the README's ("Docker" section); tests/test_deploy.py keeps them identical.
# Configuration: /app/config.yaml (mount your own over it, or point GOOSE_CONFIG elsewhere) and GOOSE_* variables.
# Models: mount a directory at /models and set GOOSE_MODEL_PATH (or pass --model /models/...).

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------------------------
# Build stage: a virtual environment with torch and Goose, and the files the image ships, readable by everyone.
FROM python:${PYTHON_VERSION}-slim-trixie AS builder

# torch's own wheel index picks the build: .../whl/cpu (no CUDA libraries, ~5x smaller) or .../whl/cu130 etc.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# Optional dependencies of pyproject.toml to install: fast = the compiled World tokenizer; cuda = triton.
ARG EXTRAS=fast
# model.strategy written into the image's config.yaml: device and matmul dtype ("cuda fp16" for the CUDA image).
ARG STRATEGY="cpu fp32"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

# A C++ compiler for this stage only: it builds the native CPU decode kernels (kernels/native_build.py) below, and
# the runtime stage copies the built library, not the compiler.
# DL3008 (pin apt versions) is ignored: g++ is whatever the base image's Debian release ships, and the library it
# builds is checked against torch's own ops every time it is loaded.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# torch first, in its own layer: the largest download and the one that changes least.
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY . .
# The project (not editable: the image holds no source tree); torch>=2.4 is already satisfied above.
# DL3013 (pin versions in pip) is ignored for this one line: it installs the local project, whose dependency ranges
# live in pyproject.toml (torch, the one large dependency, is pinned above).
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]"

# Build the native CPU decode kernels now, into the directory the runtime stage copies and names in
# GOOSE_KERNEL_DIR: the library is built for every x86-64 vector width and picked at load, so it runs on any host.
ENV GOOSE_KERNEL_DIR=/opt/goose-kernels
RUN python -I -c "from kernels import native_build; print(native_build.load().path)"

# What the runtime stage copies, at the same paths under /app as in the repository (cp --parents), with modes a
# non-root user can read (checkpoints are often written 0600). config.yaml gets the image's model.strategy; the
# grep fails the build if config.yaml's layout ever stops matching.
RUN mkdir -p /stage/app /stage/models \
    && cp -r --parents config.yaml models/rwkv7-austen docker/healthcheck.py /stage/app/ \
    && sed -i "s/^  strategy: .*/  strategy: ${STRATEGY}/" /stage/app/config.yaml \
    && grep -qx "  strategy: ${STRATEGY}" /stage/app/config.yaml \
    && chmod -R u=rwX,go=rX /stage

# ---------------------------------------------------------------------------------------------------------------
# Runtime stage: the interpreter, the virtual environment, config.yaml and the default model; no compilers, no source.
FROM python:${PYTHON_VERSION}-slim-trixie AS runtime

LABEL org.opencontainers.image.title="goose" \
      org.opencontainers.image.description="OpenAI-compatible inference server for RWKV-7 models" \
      org.opencontainers.image.licenses="Apache-2.0"

# An unprivileged user with a fixed numeric id (Kubernetes runAsNonRoot checks the number); it owns nothing here.
RUN groupadd --system --gid 10001 goose \
    && useradd --system --uid 10001 --gid goose --no-create-home --home-dir /tmp --shell /usr/sbin/nologin goose

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/goose-kernels /opt/goose-kernels
COPY --from=builder /stage/app /app
COPY --from=builder /stage/models /models

# GOOSE_SERVER_HOST=0.0.0.0: inside a container the loopback default would be unreachable. With a non-loopback
# bind and no server.allowed_hosts, any Host header is accepted, so the container's own probes are never refused.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    GOOSE_CONFIG=/app/config.yaml \
    GOOSE_KERNEL_DIR=/opt/goose-kernels \
    GOOSE_SERVER_HOST=0.0.0.0

WORKDIR /app
USER 10001:10001
EXPOSE 8000

# Liveness: /health answers 200 once the model is loaded (503 while loading or when the engine died; no API key
# needed). The start period leaves time to load a large checkpoint from /models.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py", "/health"]

# SIGTERM drains: readiness turns 503, in-flight requests get server.shutdown_timeout (30 s) to finish. Give
# `docker stop` more than that: docker stop -t 45 (compose.yaml sets stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["goose", "serve"]
CMD []
