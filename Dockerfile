# syntax=docker/dockerfile:1
#
# Tapserve container image.
#
#   docker build -t tapserve:0.1.0 .                          # CPU (the tensorflow wheel)
#   docker build --build-arg GPU=true -t tapserve:0.1.0-gpu .  # adds TensorFlow's CUDA wheels
#   docker run --rm -p 8001:8001 -p 8002:8002 --read-only --tmpfs /tmp \
#       -v "$PWD/models:/models:ro" tapserve:0.1.0
#
# The builder installs the project exactly as the README does (`pip install .`) into a
# virtual environment at /opt/venv; the final stage copies only that venv, so no build
# tooling, pip cache or source tree ships. Both stages use the same base image, so the
# venv's interpreter symlinks (/usr/local/bin/python3.11) resolve in the final stage.

# ---- builder ---------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS builder

# GPU=true also installs tensorflow[and-cuda]: the CUDA/cuDNN runtime as pip wheels, found
# by TensorFlow on its own. The NVIDIA driver comes from the node (device plugin).
ARG GPU=false

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the wheel is built from (see .dockerignore): metadata, README (the package's
# long description) and the package itself, generated protobuf modules included.
COPY pyproject.toml README.md constraints.txt ./
COPY service/ service/

RUN pip install --no-cache-dir -c constraints.txt . \
    && if [ "$GPU" = "true" ]; then \
         pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0"; \
       fi

# ---- runtime ---------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="tapserve" \
      org.opencontainers.image.description="gRPC model server for Keras functional models"

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 tapserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin tapserve

COPY --from=builder /opt/venv /opt/venv

# Read-only root filesystem friendly: every place Python, Keras or TensorFlow might write
# (home dir, ~/.keras, temp files, bytecode) points under /tmp, the one writable mount
# (a tmpfs with `docker run --read-only --tmpfs /tmp`, an emptyDir in Kubernetes).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    KERAS_HOME=/tmp/.keras \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TAPSERVE_MODEL_REPOSITORY=/models \
    TAPSERVE_GRPC_PORT=8001 \
    TAPSERVE_METRICS_PORT=8002

# Model repository: mount it here (read-only is enough).
VOLUME ["/models"]
WORKDIR /tmp
USER 10001:10001

# 8001: gRPC (KServe v2 inference, grpc.health.v1, reflection); 8002: Prometheus /metrics.
EXPOSE 8001 8002

# Kubernetes ignores HEALTHCHECK (it runs its own native gRPC probes, see
# deploy/k8s/deployment.yaml); this one serves `docker run` / Compose. It asks the same
# grpc.health.v1 service "" with the grpcio-health-checking client already in the venv.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os,sys,grpc;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;c=grpc.insecure_channel('127.0.0.1:'+os.environ.get('TAPSERVE_GRPC_PORT','8001'));r=g.HealthStub(c).Check(h.HealthCheckRequest(service=''),timeout=4);sys.exit(r.status!=h.HealthCheckResponse.SERVING)"]

# SIGTERM (docker stop, Kubernetes) goes straight to the server, which drains in-flight
# requests within TAPSERVE_DRAIN_GRACE_SECONDS (default 30) and exits 0: give
# `docker stop -t` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tapserve"]
CMD ["serve"]
