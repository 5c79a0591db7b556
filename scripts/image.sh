#!/usr/bin/env bash
# Build and run the Tapserve image with podman, including on hosts where builds go through
# a TLS-intercepting proxy or where rootless limits are below podman's defaults.
#   scripts/image.sh build [TAG] [podman build flags...]   e.g. --build-arg BACKEND=jax
#   scripts/image.sh run [TAG] [MODELS_DIR] [tapserve serve flags...]
#   scripts/image.sh pip-cert            # the CA file the host's pip trusts, if any
# TAG defaults to localhost/tapserve:0.1.0, MODELS_DIR to ./models.
set -euo pipefail
cd "$(dirname "$0")/.."
command="${1:-}"
shift || true

# The CA the host's pip trusts (PIP_CERT, or `cert` in a pip config): where PyPI is
# reached through a TLS-intercepting proxy, the build's pip must trust it too.
pip_cert() {
  if [ -n "${PIP_CERT:-}" ]; then echo "$PIP_CERT"; return; fi
  python3 -m pip config list 2>/dev/null | sed -n "s/^global\.cert='\(.*\)'\$/\1/p" | tail -1
}

# podman's default of 1048576 open files is above many hosts' hard limit, and raising it
# needs CAP_SYS_RESOURCE ("error setting rlimit type 7"): ask for the hard limit this
# shell has, in a config of this run only (a CONTAINERS_CONF already set is kept).
limits() {
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    conf=$(mktemp)
    trap 'rm -f "$conf" "${pipconf:-}"' EXIT
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s"]\n' \
      "$(ulimit -Hn)" "$(ulimit -Hn)" >"$conf"
    export CONTAINERS_CONF="$conf"
  fi
}

case "$command" in
  pip-cert)
    pip_cert ;;
  build)
    tag="${1:-localhost/tapserve:0.1.0}"
    shift || true
    limits
    cert=$(pip_cert)
    mounts=()
    if [ -n "$cert" ]; then
      # Mounted for the build only: nothing of it is in the image.
      pipconf=$(mktemp)
      printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$pipconf"
      chmod 644 "$pipconf"
      mounts=(--volume "$cert:/etc/ssl/certs/ca-certificates.crt:ro"
              --volume "$pipconf:/etc/pip.conf:ro")
    fi
    # --format docker keeps the HEALTHCHECK (the OCI format drops it).
    podman build --format docker "${mounts[@]}" --tag "$tag" "$@" . ;;
  run)
    tag="${1:-localhost/tapserve:0.1.0}"
    models="$(realpath "${2:-models}")"
    shift 2 || shift $#
    limits
    exec podman run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \
      --read-only --tmpfs /tmp -v "$models:/models:ro" "$tag" serve "$@" ;;
  *)
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2 ;;
esac
