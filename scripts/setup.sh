#!/usr/bin/env bash
# Create .venv at the repository root and install Tapserve into it (idempotent).
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh examples,test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-examples}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip==26.3"
echo "setup: installing tapserve[$extras] (pinned by constraints.txt)"
# PYTHONWARNINGS: setuptools' box about editable installs is advice for its own
# developers, not an error; a first-time user reads it as a failed set-up.
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$extras]"
