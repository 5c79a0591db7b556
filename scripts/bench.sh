#!/usr/bin/env bash
# Run the benchmarks (bench/run.py; flags pass through), setting up only what is missing:
#   scripts/bench.sh                      # scenarios 1-3, Tapserve alone (~5 min)
#   scripts/bench.sh --peers              # + MLServer and PyTriton in scenario 2
#   scripts/bench.sh --scenarios 1 --duration 5 --no-sweep
#   scripts/bench.sh --backend jax,tensorflow --scenarios 1,2   # both backends side by side
# .venv comes from scripts/setup.sh (the load client builds requests with tritonclient,
# a test extra). With --peers, each peer gets its own venv under bench/.venvs, pinned by
# bench/requirements-*.txt (about 2.4 GB each; the first install takes minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import service, tritonclient.grpc" 2>/dev/null; then
  scripts/setup.sh examples,test
fi
peer_venv() {  # peer_venv NAME PYTHON: create bench/.venvs/NAME from its requirements
  local name=$1 python=$2 venv=bench/.venvs/$1
  [ -f "$venv/.installed" ] && return 0
  echo "bench: creating $venv with $($python --version)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade "pip==26.3"
  "$venv/bin/python" -m pip install --quiet -r "bench/requirements-$name.txt"
  touch "$venv/.installed"
}
if [[ " $* " == *" --peers "* ]]; then
  peer_venv mlserver "${PYTHON:-python3}"
  # PyTriton's Triton server loads the running Python's libpython: a Debian python3.11
  # has it on the default path; with another Python bench/run.py sets LD_LIBRARY_PATH.
  if [ -x /usr/bin/python3.11 ]; then peer_venv pytriton /usr/bin/python3.11
  else peer_venv pytriton "${PYTHON:-python3}"; fi
fi
exec .venv/bin/python bench/run.py "$@"
