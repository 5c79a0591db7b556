#!/usr/bin/env bash
# Create a venv at the repository root and install Tapserve into it (idempotent).
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh examples,test
#   EXTRAS: pyproject.toml's extras, comma-separated. Without a backend among them
#   (tensorflow, jax, jax-cuda), tensorflow is added: the default backend.
#   VENV=.venv-jax scripts/setup.sh jax,test   # another venv (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-examples}"
case ",$extras," in
  *,tensorflow,*|*,jax,*|*,jax-cuda,*) ;;
  *) extras="tensorflow,$extras" ;;
esac
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade "pip==26.3"
echo "setup: installing tapserve[$extras] into $venv (pinned by constraints.txt)"
# PYTHONWARNINGS: setuptools' box about editable installs is advice for its own
# developers, not an error; a first-time user reads it as a failed set-up.
PYTHONWARNINGS=ignore "$venv/bin/python" -m pip install --quiet -c constraints.txt \
  -e ".[$extras]"
