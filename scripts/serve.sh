#!/usr/bin/env bash
# Set up, build the example models if missing, and serve them:
# gRPC on :8001, metrics on :8002 (override with TAPSERVE_* variables or flags).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh examples
.venv/bin/python models/build_examples.py --models-dir models
exec .venv/bin/tapserve serve --model-repository models "$@"
