#!/usr/bin/env bash
# The service tests once more, against a throwaway PostgreSQL server (Debian's package; installed
# when missing and apt-get can). `make test-slow` runs this after the slow tier.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's postgresql for the service tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || true
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
fi
if [ -z "$bin" ]; then
    echo "postgres-tests: no PostgreSQL server here (apt-get install postgresql); service tests ran on SQLite only" >&2
    exit 0
fi
data=$(mktemp -d /tmp/phitune-pg.XXXXXX)
port=$($PYTHON -c "from phitune.training.distributed import free_port; print(free_port())")
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$data"
as_pg "$bin/initdb -D $data/db -A trust -U postgres >/dev/null"
as_pg "$bin/pg_ctl -D $data/db -o '-p $port -k $data -c listen_addresses=127.0.0.1' -l $data/log -w start >/dev/null"
trap 'as_pg "$bin/pg_ctl -D $data/db -m immediate stop >/dev/null" || true; rm -rf "$data"' EXIT
PHITUNE_TEST_POSTGRES="postgresql://postgres@127.0.0.1:$port/postgres" $PYTHON -m pytest -q tests/serve/test_serve.py tests/serve/test_serve_migrations.py
