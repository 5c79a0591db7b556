#!/usr/bin/env bash
# Build the Dockerfile with podman (daemonless, Debian's package), once per backend
# (--build-arg BACKEND=tensorflow, then jax), and test each image:
# tests/e2e/test_deploy_image.py runs it as a user would (stock tritonclient, /metrics,
# HEALTHCHECK, read-only root filesystem as non-root, SIGTERM under load), then the suite
# runs inside it (scripts/suite-in-image.sh).
#   scripts/test-image.sh [pytest args]     # CI runs it from .ci/run
#   TAPSERVE_TEST_BACKENDS=jax scripts/test-image.sh    # one image only
# Rootful podman (as root, or through sudo). The base image comes from
# scripts/base-image.sh, as no container registry is reachable from CI.
# The builds' logs: /tmp/tapserve-image-build-<backend>.log. The images are tagged
# localhost/tapserve:test-<backend>.
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo -E "$0" "$@"
cd "$(dirname "$0")/.."
backends="${TAPSERVE_TEST_BACKENDS:-tensorflow jax}"
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v runc >/dev/null; then
  echo "setup: installing Debian's podman, runc and debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman runc debootstrap >/dev/null
fi
# Settings for this host, in a config of this run only (CONTAINERS_CONF):
# - runc: Debian 12's crun refuses a hybrid cgroup layout (cgroup v1 plus a cgroup2 mount
#   with controllers: "cgroups in hybrid mode not supported"), as on this CI machine;
# - podman's default limit of 1048576 open files is above a hard limit such as 20000, and
#   raising it needs CAP_SYS_RESOURCE ("setrlimit RLIMIT_NOFILE: Operation not
#   permitted"): ask for the hard limit this shell has.
conf=$(mktemp)
trap 'rm -f "$conf"' EXIT
cat >"$conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$conf"
scripts/base-image.sh
# The builds as users run them (scripts/image.sh: the host pip's CA mounted for the build's
# pip only, the HEALTHCHECK kept); CONTAINERS_CONF above is kept by it.
PIP_CERT=$(scripts/image.sh pip-cert)
if ! .venv/bin/python -c "import tritonclient.grpc" 2>/dev/null; then
  scripts/setup.sh examples,test
fi
ca=()
[ -z "$PIP_CERT" ] || ca=(--volume "$PIP_CERT:/run/ca.crt:ro" --env PIP_CERT=/run/ca.crt)
# The image runs as UID 10001, which may not read this checkout (a clone under a 0700
# temporary folder, as CI's): give it a world-readable copy of the tracked tree.
src=$(mktemp -d)
trap 'rm -rf "$src" "$conf"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - | tar -xf - -C "$src"
chmod -R a+rX "$src"
for backend in $backends; do
  image="localhost/tapserve:test-$backend"
  log="/tmp/tapserve-image-build-$backend.log"
  echo "build: $image (--build-arg BACKEND=$backend)"
  start=$SECONDS
  scripts/image.sh build "$image" --pull=never --build-arg "BACKEND=$backend" >"$log" 2>&1 \
    || { tail -40 "$log" >&2; exit 1; }
  size=$(podman image inspect "$image" --format '{{.Size}}')
  echo "build: done in $((SECONDS - start)) s, image $((size / 1000000)) MB"
  # The test process's Keras stays on TensorFlow: the JAX image's answers are checked
  # against Keras on TensorFlow.
  echo "test: the $backend image, run as a user runs it"
  TAPSERVE_BACKEND=tensorflow TAPSERVE_TEST_IMAGE="$image" \
    TAPSERVE_TEST_IMAGE_BACKEND="$backend" \
    .venv/bin/python -m pytest --e2e tests/e2e/test_deploy_image.py "$@"
  echo "test: the suite inside the $backend image (scripts/suite-in-image.sh)"
  podman run --rm --no-healthcheck --read-only --tmpfs /tmp:rw,exec,size=4g "${ca[@]}" \
    --volume "$src:/src:ro" --entrypoint sh "$image" /src/scripts/suite-in-image.sh 2>&1 \
    | grep -v -E '^(I0000|WARNING: All log messages before absl|To enable the following)'
done
