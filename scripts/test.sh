#!/usr/bin/env bash
# Set up everything the tests need (from nothing but Python 3.11, pip and gcc) and run
# the whole suite: lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh examples,test
# Deploy linters live in their own venv: checkov's dependencies must not move our pins.
if [ ! -x .venv-deploy/bin/checkov ]; then
  echo "setup: creating .venv-deploy for the manifest and Dockerfile linters"
  python3 -m venv .venv-deploy
  .venv-deploy/bin/python -m pip install --quiet --upgrade "pip==26.3"
fi
.venv-deploy/bin/python -m pip install --quiet -r deploy/requirements-lint.txt
# The docs site's builder, in its own venv too (mkdocs-material pins its own Markdown stack).
if [ ! -x .venv-docs/bin/mkdocs ]; then
  echo "setup: creating .venv-docs for the docs site"
  python3 -m venv .venv-docs
  .venv-docs/bin/python -m pip install --quiet --upgrade "pip==26.3"
fi
.venv-docs/bin/python -m pip install --quiet -r docs/requirements.txt
# A real Prometheus for the dashboard test (Debian package).
if ! command -v prometheus >/dev/null 2>&1; then
  echo "setup: installing Debian's prometheus"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
echo "lint: ruff"
.venv/bin/ruff check .
echo "types: mypy --strict (service/, and the protocol tests' fake data plane)"
.venv/bin/mypy
echo "docs: mkdocs build --strict (no broken link or anchor)"
NO_MKDOCS_2_WARNING=1 .venv-docs/bin/mkdocs build --strict --quiet
# Two sessions: tritonclient's generated protobufs and ours cannot share a process.
echo "test: pytest (in-process)"
.venv/bin/python -m pytest "$@"
echo "test: pytest --e2e (tapserve serve + stock tritonclient)"
.venv/bin/python -m pytest --e2e "$@"
