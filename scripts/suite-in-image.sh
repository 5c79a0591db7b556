#!/bin/sh
# Run inside the image by scripts/test-image.sh: the test suite on the image's own Python,
# backend (tensorflow-cpu, stripped; or jax and jaxlib, stripped) and installed tapserve,
# so nothing the Dockerfile removes or swaps is something the server needs. The backend is
# the image's TAPSERVE_BACKEND. The repository is mounted read-only at /src; the test
# tools go into a venv under /tmp that sees the image's packages.
# Left out: tests/deploy (linters of files, not the image) and the dashboard's load test
# (it needs Debian's prometheus binary). The JAX image runs the tests that exercise what
# its install holds (jax and the stripped jaxlib, no TensorFlow): the JAX runtime, the
# no-TensorFlow check, the packaging checks, and the served models through every door;
# the rest of the JAX part runs in CI's .venv-jax (scripts/test.sh), from the same wheels.
set -eu
python -m venv /tmp/suite
echo /opt/venv/lib/python3.11/site-packages > /tmp/suite/lib/python3.11/site-packages/image.pth
# The test tools are pyproject.toml's `test` extra, pinned by constraints.txt.
set -f  # "tritonclient[grpc,http]" is a requirement, not a pattern
deps=$(python -c "import tomllib; print(' '.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['optional-dependencies']['test']))")
/tmp/suite/bin/pip install --quiet --disable-pip-version-check -c /src/constraints.txt $deps
set +f
select=""
inprocess="tests"
e2e="tests/e2e"
if [ "${TAPSERVE_BACKEND:-tensorflow}" = tensorflow ]; then
  # The stock TF Serving client (test-tensorflow extra): beside the image's tensorflow-cpu,
  # without the full tensorflow wheel it names.
  tfs=$(python -c "import tomllib; print(' '.join(d for d in tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['optional-dependencies']['test-tensorflow'] if d.startswith('tensorflow-serving-api')))")
  /tmp/suite/bin/pip install --quiet --disable-pip-version-check --no-deps $tfs
else
  select="not frontend_only"
  # XLA's programs kept on disk for the run, as scripts/test.sh does.
  export JAX_COMPILATION_CACHE_DIR=/tmp/xla-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
  inprocess="tests/test_runtime_jax.py tests/test_no_tensorflow.py tests/test_packaging.py"
  e2e="tests/e2e/test_serving.py tests/e2e/test_tfserving.py tests/e2e/test_explain.py"
fi
# The e2e tests start the `tapserve` beside their Python: the image's.
ln -s /opt/venv/bin/tapserve /tmp/suite/bin/tapserve
/tmp/suite/bin/python -c "import service; assert service.__file__.startswith('/opt/venv/')"
cd /src
# The pytest script, not `python -m pytest`, which would import /src/service instead.
# $inprocess and $e2e: lists of paths, split on purpose.
# shellcheck disable=SC2086
/tmp/suite/bin/pytest -q -p no:cacheprovider --ignore=tests/deploy -m "$select" \
  --deselect tests/test_dashboard.py::test_every_dashboard_panel_and_adapter_rule_has_sane_data_under_load \
  $inprocess
# shellcheck disable=SC2086
/tmp/suite/bin/pytest -q -p no:cacheprovider --e2e --ignore=tests/e2e/test_deploy_image.py \
  -m "$select" $e2e
