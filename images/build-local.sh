#!/usr/bin/env bash
# Build the images that tests and the local demo need, on a machine with no container registry:
#   1. dockerworker/local-python:bookworm  (debootstrap, images/local-base/build.sh)
#   2. dockerworker/postgres:15-local-2     (images/postgres-local, for the compose stack)
#   3. dockerworker/prefect:3.9.1-local    (images/prefect/Dockerfile on top of 1)
#   4. dockerworker/prefect:2.20.27-local  (the same Dockerfile: the Prefect 2 compatibility set)
#   5. dockerworker/prefect-git:3.9.1-local (images/prefect-git on top of 3: git, ssh, s3fs for
#      the pull-step tests; the plain image 3 stays without git on purpose)
#   6. dockerworker/prometheus:2.42-local  (images/prometheus-local: compose's monitoring profile)
# Idempotent: each image is skipped when it already exists. Needs root (debootstrap) and access
# to PyPI from the host network; the host CA bundle is handed to pip for TLS-inspecting proxies.
# Env: PREFECT_VERSIONS ("3.9.1 2.20.27"; PREFECT_VERSION=X builds only X),
#      CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
base=dockerworker/local-python:bookworm
versions=${PREFECT_VERSION:-${PREFECT_VERSIONS:-3.9.1 2.20.27}}
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

"$here/local-base/build.sh" "$base"

# PostgreSQL for the compose stack, from Debian's packages (apt reaches Debian from the host net).
postgres=dockerworker/postgres:15-local-2  # -2: POSTGRES_PASSWORD_FILE
if docker image inspect "$postgres" >/dev/null 2>&1; then
  echo "build-local: $postgres already present"
else
  echo "build-local: building $postgres from $base"
  docker build --network host --build-arg "BASE_IMAGE=$base" -t "$postgres" "$here/postgres-local"
fi

# Prometheus (and promtool) for the compose stack's monitoring profile, from Debian's package.
prometheus=dockerworker/prometheus:2.42-local
if docker image inspect "$prometheus" >/dev/null 2>&1; then
  echo "build-local: $prometheus already present"
else
  echo "build-local: building $prometheus from $base"
  docker build --network host --build-arg "BASE_IMAGE=$base" -t "$prometheus" \
    "$here/prometheus-local"
fi

build_prefect() {  # VERSION: dockerworker/prefect:VERSION-local, unless present
  local version=$1 image=dockerworker/prefect:$1-local ctx start
  if docker image inspect "$image" >/dev/null 2>&1; then
    echo "build-local: $image already present"
    return 0
  fi
  ctx=$(mktemp -d /tmp/prefect-image.XXXXXX)
  cp "$here/prefect/Dockerfile" "$ctx/Dockerfile"
  if [ -s "$ca" ]; then
    cp "$ca" "$ctx/ca.crt"
    echo "build-local: pip will trust $ca"
  else
    : > "$ctx/ca.crt"
    echo "build-local: no CA bundle at $ca, pip uses its defaults"
  fi
  echo "build-local: building $image from $base (pip install prefect==$version, 1-2 minutes)"
  start=$SECONDS
  docker build --network host \
    --build-arg "BASE_IMAGE=$base" --build-arg "PREFECT_VERSION=$version" \
    -t "$image" "$ctx" || { rm -rf "$ctx"; return 1; }
  rm -rf "$ctx"
  echo "build-local: built $image in $((SECONDS - start)) s"
}

for version in $versions; do
  build_prefect "$version"
done

# The pull-step test image: git + openssh-client + s3fs on the 3.x runtime (only when it is built).
git_image=dockerworker/prefect-git:3.9.1-local
if docker image inspect "$git_image" >/dev/null 2>&1; then
  echo "build-local: $git_image already present"
elif docker image inspect dockerworker/prefect:3.9.1-local >/dev/null 2>&1; then
  ctx=$(mktemp -d /tmp/prefect-git-image.XXXXXX)
  cp "$here/prefect-git/Dockerfile" "$ctx/Dockerfile"
  if [ -s "$ca" ]; then cp "$ca" "$ctx/ca.crt"; else : > "$ctx/ca.crt"; fi
  echo "build-local: building $git_image (apt git/openssh-client, pip install s3fs)"
  start=$SECONDS
  docker build --network host --build-arg BASE_IMAGE=dockerworker/prefect:3.9.1-local \
    -t "$git_image" "$ctx" || { rm -rf "$ctx"; exit 1; }
  rm -rf "$ctx"
  echo "build-local: built $git_image in $((SECONDS - start)) s"
fi
