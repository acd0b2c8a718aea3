#!/usr/bin/env bash
# Build a Python base image from Debian packages, for machines that reach no container registry.
# Usage: images/local-base/build.sh [IMAGE]   (default dockerworker/local-python:bookworm)
# Skips the work when the image already exists. Needs root and debootstrap (installed if missing).
set -euo pipefail
image=${1:-dockerworker/local-python:bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "local-base: $image already present"
  exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
root=$(mktemp -d /tmp/local-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "local-base: debootstrap bookworm into $root (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'CMD ["python3"]' - "$image" >/dev/null
echo "local-base: built $image"
