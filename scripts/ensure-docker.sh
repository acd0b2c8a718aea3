#!/usr/bin/env bash
# Make sure a Docker engine answers: use the running one, or install and start dockerd.
set -euo pipefail
ensure_compose() {  # the compose test needs `docker compose` or Debian's docker-compose
  docker compose version >/dev/null 2>&1 && return 0
  command -v docker-compose >/dev/null && return 0
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
}
if docker info >/dev/null 2>&1; then
  ensure_compose
  exit 0
fi
echo "ensure-docker: no Docker engine answers; starting one"
if ! command -v dockerd >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
if [ ! -f /etc/docker/daemon.json ] && command -v fuse-overlayfs >/dev/null \
   && ! grep -q overlay /proc/filesystems; then
  mkdir -p /etc/docker
  echo '{"storage-driver": "fuse-overlayfs"}' > /etc/docker/daemon.json
fi
nohup dockerd >/var/log/dockerd-ci.log 2>&1 &
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    echo "ensure-docker: engine up"
    ensure_compose
    exit 0
  fi
  sleep 1
done
echo "ensure-docker: dockerd did not come up; its log:" >&2
tail -n 40 /var/log/dockerd-ci.log >&2
exit 1
