#!/usr/bin/env bash
# Make sure PostgreSQL server binaries exist, so tests/pg_server.py can start a throwaway
# server for the store tests (in CI those tests fail rather than skip without one).
# Nothing to do when CQRS_RESILIENCE_PG_DSN names a server, or initdb is already installed.
set -euo pipefail

if [ -n "${CQRS_RESILIENCE_PG_DSN:-}" ]; then
    echo "postgres.sh: CQRS_RESILIENCE_PG_DSN is set; the tests use that server"
    exit 0
fi

find_initdb() {
    command -v initdb 2>/dev/null && return 0
    # Debian/Ubuntu keep the server binaries off PATH.
    ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 | grep .
}

if found=$(find_initdb); then
    echo "postgres.sh: found $found"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "postgres.sh: initdb not found and no apt-get; install the PostgreSQL server" \
        "or set CQRS_RESILIENCE_PG_DSN" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

# The tests start their own server: keep the package from creating and starting a system one.
$sudo mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" |
    $sudo tee /etc/postgresql-common/createcluster.d/cqrs-resilience.conf >/dev/null
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends postgresql

if found=$(find_initdb); then
    echo "postgres.sh: installed $found"
else
    echo "postgres.sh: installed postgresql but still no initdb" >&2
    exit 1
fi
