#!/usr/bin/env bash
# Set up everything the tests need (from nothing but Python 3.11, pip and gcc) and run
# the whole suite: lint, then pytest on the TensorFlow backend in .venv (which has JAX
# too, for the cross-backend tests), then the suite's JAX part in .venv-jax, a venv
# without TensorFlow. Arguments go to every pytest run (e.g. a test file, -k, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh tensorflow,jax,examples,test,test-tensorflow
# What a JAX user installs, and nothing that brings TensorFlow (tests/test_packaging.py
# checks the extras' metadata; this checks the venv itself).
VENV=.venv-jax scripts/setup.sh jax,examples,test
if .venv-jax/bin/python -c "import importlib.util as u, sys; sys.exit(not u.find_spec('tensorflow'))"
then
  echo "setup: .venv-jax has tensorflow: remove .venv-jax and run again" >&2
  exit 1
fi
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
# The JAX part: every test that runs a model, on --backend jax without TensorFlow. Left
# out: what is the same on every backend (the front doors: marker frontend_only; the
# deploy linters, files only), run once above. XLA's compiled programs are kept on disk
# for this run (docs/backends.md: the compile cache), as a deployment would: the suite
# loads the same small models many times, and each load compiles its batch-size ladder.
JAX_COMPILATION_CACHE_DIR=$(mktemp -d)
trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
echo "test: pytest on jax, no TensorFlow (.venv-jax, in-process)"
TAPSERVE_BACKEND=jax .venv-jax/bin/python -m pytest --ignore=tests/deploy \
  -m "not frontend_only" "$@"
echo "test: pytest --e2e on jax, no TensorFlow (.venv-jax, tapserve serve --backend jax)"
TAPSERVE_BACKEND=jax .venv-jax/bin/python -m pytest --e2e -m "not frontend_only" "$@"
