# syntax=docker/dockerfile:1
#
# Tapserve container image, on one Keras backend: BACKEND=tensorflow (default) or jax.
#
#   docker build -t tapserve:0.1.0 .                          # CPU, tensorflow-cpu
#   docker build --build-arg GPU=true -t tapserve:0.1.0-gpu .  # tensorflow + pinned CUDA wheels
#   docker build --build-arg BACKEND=jax -t tapserve:0.1.0-jax .   # CPU, jax + jaxlib, no TF
#   docker build --build-arg BACKEND=jax --build-arg GPU=true -t tapserve:0.1.0-jax-gpu .
#   docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 --read-only --tmpfs /tmp \
#       -v "$PWD/models:/models:ro" tapserve:0.1.0
#
# With podman or buildah add `--format docker`: the default OCI format has no HEALTHCHECK
# and drops it. scripts/test-image.sh builds this file with podman and tests the images.
#
# The builder installs the project's pinned dependencies (constraints.txt) and the project
# into a virtual environment at /opt/venv; the final stage copies only that venv, so no
# build tooling, pip cache or source tree ships. Both stages use the same base image, so
# the venv's interpreter symlinks (/usr/local/bin/python3.11) resolve in the final stage.

# ---- builder ---------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS builder

# BACKEND: pyproject.toml's extra of the Keras backend the image serves on (tensorflow or
# jax); the image installs no other, and sets TAPSERVE_BACKEND to it.
ARG BACKEND=tensorflow
# GPU=true: the backend's CUDA/cuDNN runtime as pip wheels, found by it on its own:
# tensorflow[and-cuda] pinned by deploy/constraints-cuda.txt, or jax[cuda13] (the jax-cuda
# extra) pinned by deploy/constraints-jax-cuda.txt. The NVIDIA driver comes from the node
# (device plugin).
ARG GPU=false

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# binutils for `strip` below; the builder's only, it does not ship.
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils=2.40-2 \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the wheel is built from (see .dockerignore): metadata, README (the package's
# long description), the pins and the package itself, generated protobuf modules included.
COPY pyproject.toml README.md constraints.txt ./
COPY deploy/constraints-cuda.txt deploy/constraints-jax-cuda.txt deploy/

# pyproject.toml's dependencies and the backend's extra (`jax-cuda` for JAX on GPUs),
# except that the TensorFlow CPU image takes tensorflow-cpu (the same version and
# `tensorflow` package without the CUDA kernels a CPU never runs: ~600 MB less) and the
# TensorFlow GPU image tensorflow[and-cuda]; then what the server never reads:
# TensorFlow's C++ headers (~290 MB, for building extensions) and the backend's shared
# libraries' full symbol tables (TensorFlow ~240 MB, jaxlib ~110 MB: for debuggers; the
# dynamic symbols the loader needs stay). The project itself follows with --no-deps, or
# pip would add the full tensorflow wheel back (so `pip check` names it as missing in the
# TensorFlow CPU image).
RUN pip install --no-cache-dir pip==26.3 \
    && case "$BACKEND/$GPU" in \
         tensorflow/true) extra=tensorflow; tf="tensorflow[and-cuda]" ;; \
         tensorflow/false) extra=tensorflow; tf="tensorflow-cpu" ;; \
         jax/true) extra=jax-cuda; tf="" ;; \
         jax/false) extra=jax; tf="" ;; \
         *) echo "BACKEND=tensorflow|jax and GPU=true|false, not $BACKEND/$GPU" >&2; exit 2 ;; \
       esac \
    && python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies'][sys.argv[1]]; print('\n'.join(d.replace('tensorflow==', sys.argv[2] + '==') if sys.argv[2] else d for d in deps))" "$extra" "$tf" > requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -c deploy/constraints-cuda.txt \
         -c deploy/constraints-jax-cuda.txt -r requirements.txt \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf "$site/tensorflow/include" \
    && for lib in "$site/tensorflow" "$site/jaxlib"; do \
         if [ -d "$lib" ]; then find "$lib" -name "*.so*" -type f -exec strip --strip-unneeded {} +; fi; \
       done
# The project last: a change to service/ rebuilds from here, not the dependencies above.
COPY service/ service/
RUN pip install --no-cache-dir --no-deps .

# ---- runtime ---------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm

# The backend the image was built for is the server's (TAPSERVE_BACKEND below).
ARG BACKEND=tensorflow

LABEL org.opencontainers.image.title="tapserve" \
      org.opencontainers.image.description="gRPC model server for Keras functional models"

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 tapserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin tapserve

COPY --from=builder /opt/venv /opt/venv
COPY scripts/healthcheck.py /opt/tapserve/healthcheck.py

# Read-only root filesystem friendly: every place Python, Keras or its backend might write
# (home dir, ~/.keras, temp files, bytecode) points under /tmp, the one writable mount
# (a tmpfs with `docker run --read-only --tmpfs /tmp`, an emptyDir in Kubernetes).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    KERAS_HOME=/tmp/.keras \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TAPSERVE_BACKEND=$BACKEND \
    TAPSERVE_MODEL_REPOSITORY=/models \
    TAPSERVE_GRPC_PORT=8001 \
    TAPSERVE_METRICS_PORT=8002

# Model repository: mount it here (read-only is enough).
VOLUME ["/models"]
WORKDIR /tmp
USER 10001:10001

# 8000: HTTP (KServe v2 REST, TF Serving REST); 8001: gRPC (KServe v2, TF Serving,
# grpc.health.v1, reflection); 8002: Prometheus /metrics.
EXPOSE 8000 8001 8002

# Kubernetes ignores HEALTHCHECK (it runs its own native gRPC probes, see
# deploy/k8s/deployment.yaml); this one serves `docker run` / Compose. It asks the same
# grpc.health.v1 service "" on the ports the server process really listens on (read from
# /proc), so `serve --grpc-port 9001` stays healthy; see scripts/healthcheck.py.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/opt/tapserve/healthcheck.py"]

# SIGTERM (docker stop, Kubernetes) goes straight to the server, which drains in-flight
# requests within TAPSERVE_DRAIN_GRACE_SECONDS (default 30) and exits 0: give
# `docker stop -t` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tapserve"]
CMD ["serve"]
