#!/bin/sh
# First start: create the cluster, the user and the database the POSTGRES_* variables name.
set -eu
user=${POSTGRES_USER:-postgres}
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then  # as the official image: a Docker secret
  POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  printf '%s' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" > /tmp/pwfile
  initdb --username="$user" --pwfile=/tmp/pwfile --auth-local=trust --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
  rm -f /tmp/pwfile
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  if [ "${POSTGRES_DB:-$user}" != postgres ]; then
    postgres -D "$PGDATA" -c listen_addresses='' &
    pid=$!
    until pg_isready -q -h /run/postgresql; do sleep 0.2; done
    createdb -h /run/postgresql -U "$user" "$POSTGRES_DB"
    kill "$pid"; wait "$pid" || true
  fi
fi
exec postgres -D "$PGDATA" -c listen_addresses='*'
