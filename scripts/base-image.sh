#!/usr/bin/env bash
# Build a stand-in for the Dockerfile's base image from Debian's own packages, and tag it
# with the FROM name, for machines that reach Debian and PyPI but no container registry
# (this project's CI). Where the registry is reachable, pull the real image instead.
#   scripts/base-image.sh            # once; does nothing if the image is already there
#
# Why it may stand in for python:3.11.14-slim-bookworm: that image is Debian 12
# (bookworm) with CPython 3.11 built into /usr/local. This one is Debian 12 minbase with
# Debian's python3.11 (3.11.2, the same cp311 ABI, so the same wheels install) and
# python, python3, python3.11 linked into /usr/local/bin, where the Dockerfile's
# `python -m venv` finds them and where the venv's symlinks point, in both stages; plus
# what the real image adds to Debian: ca-certificates, netbase, tzdata, LANG=C.UTF-8.
# What differs: the Python patch release and Debian's patches to it (sysconfig paths,
# ensurepip's bundled pip 23.0.1 and setuptools 66.1.1; the Dockerfile upgrades pip
# itself), and the size (~180 MB against ~150 MB). Image sizes measured on it are
# therefore the venv's plus this base's, not the real base's.
# Needs root, debootstrap and podman (Debian packages; scripts/test-image.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(awk 'toupper($1) == "FROM" { print $2; exit }' Dockerfile)
case "$base" in
  python:3.11.*-slim-bookworm) ;;
  *) echo "base-image: the Dockerfile's base is $base; this stand-in is for python:3.11.*-slim-bookworm" >&2
     exit 2 ;;
esac
# Short names resolve to docker.io/library/; tag it so, and the build finds it locally.
name="docker.io/library/$base"
if podman image exists "$name"; then
  echo "base-image: $name is already there"
  exit 0
fi
# The machine's own Debian source for bookworm (deb822 .sources files, else one-line
# sources.list entries) and apt's proxy, so the build works behind any mirror or proxy.
# DEBIAN_MIRROR overrides.
apt_mirror() {
  { for f in "${APT_ETC:-/etc/apt}"/sources.list.d/*.sources; do
      if [ -f "$f" ]; then cat "$f"; echo; fi; done; } |
    awk '/^Types:/ { deb = ($0 ~ /[[:space:]]deb([[:space:]]|$)/) }
         /^URIs:/ { uri = $2 }
         /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") hit = 1 }
         /^[[:space:]]*$/ { if (deb && hit && uri) { print uri; exit } deb = hit = 0; uri = "" }' \
    || true
  cat "${APT_ETC:-/etc/apt}"/sources.list "${APT_ETC:-/etc/apt}"/sources.list.d/*.list 2>/dev/null |
    awk '$1 == "deb" { sub(/\[[^]]*\][[:space:]]*/, ""); if ($3 == "bookworm") { print $2; exit } }' \
    || true
}
mirror="${DEBIAN_MIRROR:-$(apt_mirror | sed -n 1p)}"
if [ -z "$mirror" ]; then
  echo "base-image: no bookworm source in this machine's apt configuration; set DEBIAN_MIRROR" >&2
  exit 2
fi
if command -v apt-config >/dev/null; then
  eval "$(apt-config shell http_proxy Acquire::http::Proxy https_proxy Acquire::https::Proxy)"
  export http_proxy https_proxy
fi
root=$(mktemp -d /var/tmp/tapserve-base.XXXXXX)
log="$root.log"
echo "base-image: debootstrap bookworm from $mirror (about a minute)"
trap 'rm -rf "$root" "$log"' EXIT
# debootstrap's --include resolves dependencies only partly (python3.11-venv's
# distutils); apt inside the new root does it properly.
if ! { debootstrap --variant=minbase bookworm "$root" "$mirror" \
       && chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends \
            python3.11-venv ca-certificates netbase tzdata'; } >"$log" 2>&1; then
  tail -30 "$log" >&2
  exit 1
fi
for link in python python3 python3.11; do
  ln -sf /usr/bin/python3.11 "$root/usr/local/bin/$link"
done
version=$(chroot "$root" /usr/local/bin/python --version)
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | podman import --quiet \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$name" >/dev/null
echo "base-image: tagged $name ($version)"
