#!/usr/bin/env bash
# Runs a command against a throwaway PostgreSQL server, e.g.
#
#   scripts/pg-test.sh cargo test -p openshell-store
#
# The server lives in a fresh temp dir, listens on 127.0.0.1 on a free port
# with trust auth (local test use only), and is stopped and deleted on exit
# whatever the command did. The command sees OPENSHELL_TEST_POSTGRES_URL
# (superuser `postgres`, database `postgres`); the script exits with the
# command's status. Needs a PostgreSQL server install (Debian: `postgresql`).
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

# Debian installs servers side by side as /usr/lib/postgresql/<major>/bin;
# take the newest, else whatever is on PATH.
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] && command -v initdb >/dev/null; then
    bindir=$(dirname "$(command -v initdb)")
fi
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    echo "pg-test.sh: no PostgreSQL server found (looked in /usr/lib/postgresql/*/bin and PATH); install one, e.g. apt-get install postgresql" >&2
    exit 1
fi

# initdb and pg_ctl refuse to run as root, so as root the server runs as the
# `postgres` system user; otherwise as whoever runs this.
if [ "$(id -u)" -eq 0 ]; then
    as_server() { runuser -u postgres -- "$@"; }
else
    as_server() { "$@"; }
fi

tmp=$(mktemp -d -t openshell-pg.XXXXXX)
cleanup() {
    as_server "$bindir/pg_ctl" -D "$tmp/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$tmp"
fi
as_server mkdir "$tmp/socket"

# --no-sync and fsync=off: the data is thrown away, so durability only costs time.
as_server "$bindir/initdb" -D "$tmp/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
    >"$tmp/initdb.log" 2>&1 || {
    cat "$tmp/initdb.log" >&2
    echo "pg-test.sh: initdb failed" >&2
    exit 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
        echo $((20000 + RANDOM % 40000))
}

# A port found free can be taken before the server binds it; try a few.
started=""
for _ in 1 2 3 4 5; do
    port=$(free_port)
    if as_server "$bindir/pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $tmp/socket -c fsync=off -c max_connections=200" \
        start >/dev/null; then
        started=1
        break
    fi
done
if [ -z "$started" ]; then
    tail -n 30 "$tmp/server.log" >&2 || true
    echo "pg-test.sh: the PostgreSQL server did not start" >&2
    exit 1
fi

ready=""
for _ in $(seq 1 60); do
    if "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres; then
        ready=1
        break
    fi
    sleep 0.5
done
if [ -z "$ready" ]; then
    tail -n 30 "$tmp/server.log" >&2 || true
    echo "pg-test.sh: the PostgreSQL server did not become ready within 30s" >&2
    exit 1
fi

export OPENSHELL_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
echo "pg-test.sh: $("$bindir/postgres" --version) at $OPENSHELL_TEST_POSTGRES_URL" >&2

set +e
"$@"
status=$?
set -e
exit "$status"
