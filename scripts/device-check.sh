#!/usr/bin/env bash
# Tapserve on a GPU machine that has Python 3.12, JAX with CUDA and no network: installs
# the wheelhouse (made beforehand with `python3 scripts/wheelhouse.py`, docs/backends.md),
# then scripts/device_check.py serves the bench models with --backend jax and prints the
# devices the batches ran on, served vs in-process rows/s (bench scenarios 1 and 2), GPU
# memory after load and after 1,000 batches, and the answers against a CPU server's.
# Without a GPU it says so and runs the same steps on the CPU (a dry run; --cpu forces it).
#   scripts/device-check.sh [--cpu] [--out DIR]       # flags go to device_check.py
# Environment: PYTHON (default python3), WHEELHOUSE (default .wheelhouse), SITE (where
# the wheels go, default /tmp/site), LIMIT_S (the whole check's limit, default 470).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
wheelhouse="${WHEELHOUSE:-.wheelhouse}"
site="${SITE:-/tmp/site}"
started=$(date +%s)
fail() { echo "device-check: FAILED: $*" >&2; exit 1; }

ls "$wheelhouse"/*.whl >/dev/null 2>&1 \
  || fail "no wheels in $wheelhouse: make them where pip reaches an index (python3 scripts/wheelhouse.py)"
echo "device-check: installing $(ls "$wheelhouse"/*.whl | wc -l) wheels from $wheelhouse into $site"
rm -rf "$site"
if "$python" -m pip --version >/dev/null 2>&1; then
  timeout 120 "$python" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
    --target "$site" "$wheelhouse"/*.whl || fail "pip install of the wheelhouse into $site"
else  # no pip: a wheel is a zip of what goes on the path (no entry points are needed)
  echo "device-check: no pip for $python: unpacking the wheels instead"
  timeout 120 "$python" -c 'import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])' "$site" "$wheelhouse"/*.whl \
    || fail "unpacking the wheelhouse into $site"
fi
# The wheels first, then this tree (Tapserve runs from source).
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
requirements=()
[ -f "$wheelhouse/device-requirements.txt" ] && requirements=(--requirements "$wheelhouse/device-requirements.txt")
status=0
timeout --signal=TERM --kill-after=20 "${LIMIT_S:-470}" \
  "$python" scripts/device_check.py "${requirements[@]}" "$@" || status=$?
[ "$status" = 124 ] && fail "over the ${LIMIT_S:-470} s limit"
[ "$status" = 0 ] || fail "exit status $status (the line above says which step)"
echo "device-check: OK in $(( $(date +%s) - started )) s"
