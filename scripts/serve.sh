#!/usr/bin/env bash
# Set up, build the example models if missing, and serve them:
# gRPC on :8001, metrics on :8002 (override with TAPSERVE_* variables or flags).
# TAPSERVE_BACKEND=jax scripts/serve.sh: the JAX backend, installed without TensorFlow.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh "${TAPSERVE_BACKEND:-tensorflow},examples"
.venv/bin/python models/build_examples.py --models-dir models
exec .venv/bin/tapserve serve --model-repository models "$@"
