#!/usr/bin/env bash
# scripts/device-check.sh's dry run on a machine without a GPU: a wheelhouse for this
# Python (DRY_PYTHON, default python3.11; python3.12 is the GPU machine's) in a scratch
# folder, a fresh venv with only what the GPU machine has preinstalled (JAX on the CPU
# here), then the check itself in that venv, which finds no GPU, says so and runs the
# same steps on the CPU. Proves the wheelhouse and the script; measures nothing about GPUs.
#   scripts/device-check-dry-run.sh [device_check.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${DRY_PYTHON:-python3.11}"
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
scratch="${SCRATCH:-/tmp/tapserve-dry-run-$version}"
mkdir -p "$scratch"
"$python" scripts/wheelhouse.py --python-version "$version" --dest "$scratch/wheelhouse"
if [ ! -f "$scratch/venv/.installed" ]; then
  rm -rf "$scratch/venv"
  "$python" -m venv "$scratch/venv"
  # The GPU machine's preinstalled list (scripts/wheelhouse.py DEVICE_HAS, CUDA plugins
  # aside), at this project's pins where it has them.
  "$scratch/venv/bin/python" -m pip install --quiet -c constraints.txt jax grpcio protobuf \
    prometheus-client aiohttp h5py pyyaml numpy ml-dtypes scipy absl-py packaging
  touch "$scratch/venv/.installed"
fi
PYTHON="$scratch/venv/bin/python" WHEELHOUSE="$scratch/wheelhouse" SITE="$scratch/site" \
  exec scripts/device-check.sh --out "$scratch/check" "$@"
