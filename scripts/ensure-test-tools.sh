#!/usr/bin/env bash
# Host tools the integration rigs need (testrig/testrig/gitserve.py): git (with git-shell and
# git http-backend) and openssh (sshd for the SSH git server, ssh/ssh-keygen for clients and
# keys), openssl for the HTTPS git server's certificate, docker-registry (Debian's distribution
# registry) for the loopback registry of testrig/testrig/registry.py: the push path, no other
# registry being reachable here. Installs only what is missing (apt-get, as root); `make test`
# runs it. sshd and the registry are never started as services: while they install, a
# policy-rc.d (if none exists) keeps Debian from starting them (sshd on port 22).
set -euo pipefail
missing=()
command -v git >/dev/null && [ -x "$(git --exec-path)/git-http-backend" ] && command -v git-shell >/dev/null \
  || missing+=(git)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v openssl >/dev/null || missing+=(openssl)
[ -x /usr/bin/docker-registry ] || missing+=(docker-registry)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "ensure-test-tools: installing ${missing[*]}"
policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 0755 "$policy" && made_policy=1
fi
trap '[ -z "$made_policy" ] || rm -f "$policy"' EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
