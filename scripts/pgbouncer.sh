#!/usr/bin/env bash
# PgBouncer in transaction pooling mode on 127.0.0.1:6432, in front of the PostgreSQL that
# scripts/services.sh starts, and the suite's PostgreSQL tests run through it (docs/scaling.md).
#
# Transaction pooling hands a server session to a client for one transaction only, so nothing
# the package does may depend on session state: no session-level SET (it uses set_config(...,
# true) and SET LOCAL, which end with their transaction), no session advisory locks, no
# server-side prepared statements (Django's psycopg backend disables them by default), no
# server-side cursors. These runs check that, with real PgBouncer and real concurrency.
#
#   bash scripts/pgbouncer.sh           # start PgBouncer (installed from Debian if missing)
#   bash scripts/pgbouncer.sh test      # ...then run the PostgreSQL tests through it
#   bash scripts/pgbouncer.sh test -k storm    # ...with more pytest arguments
#   bash scripts/pgbouncer.sh test --all       # ...the whole suite (about 6 minutes)
#   source scripts/pgbouncer.sh         # only defines the URL and functions (.ci/run does this)
set -euo pipefail

PGBOUNCER_PORT=6432
PGBOUNCER_DIR=${PGBOUNCER_DIR:-/tmp/django-idempotency-pgbouncer}
PGBOUNCER_URL="postgres://idempotency:idempotency@127.0.0.1:${PGBOUNCER_PORT}/idempotency"
# The test database of these runs: created through PgBouncer, kept by --reuse-db, and dropped
# directly on PostgreSQL before and after (PgBouncer's pooled sessions would block DROP
# DATABASE through it).
PGBOUNCER_TEST_DATABASE=test_idempotency_pgbouncer
# What runs through PgBouncer: the request contract (every answer of the decorator, on both
# modes), the store's statements, the concurrency and retry-storm tests, the crash tests and
# several outbox relays at once (SKIP LOCKED). Every other test sends the same statements
# (docs/scaling.md); the whole suite passes through PgBouncer too (test --all).
PGBOUNCER_TESTS=(
    tests/test_core.py
    tests/test_decorators.py
    tests/test_stores.py
    tests/test_concurrency.py
    tests/test_retry_storm.py
    tests/test_reliability_crashes.py
    tests/test_reliability_database.py
    tests/test_outbox_relay_processes.py
    tests/test_pgbouncer.py
)

pgbouncer_log() { echo "pgbouncer: $*"; }

pgbouncer_port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

pgbouncer_up() {
    if pgbouncer_port_open "$PGBOUNCER_PORT"; then
        pgbouncer_log "already listening on 127.0.0.1:$PGBOUNCER_PORT"
        return 0
    fi
    if ! command -v pgbouncer >/dev/null && [[ ! -x /usr/sbin/pgbouncer ]]; then
        if ((EUID != 0)); then
            pgbouncer_log "pgbouncer is not installed; run this script as root to install it"
            return 1
        fi
        pgbouncer_log "installing pgbouncer"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null
    fi
    local binary
    binary=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
    mkdir -p "$PGBOUNCER_DIR"
    # The same role and password as scripts/services.sh; PgBouncer logs in to PostgreSQL with
    # the client's own name and password.
    echo '"idempotency" "idempotency"' >"$PGBOUNCER_DIR/userlist.txt"
    cat >"$PGBOUNCER_DIR/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=5432

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = plain
auth_file = $PGBOUNCER_DIR/userlist.txt
pool_mode = transaction
; The suite's storms open 32 clients and several gunicorn workers at once.
max_client_conn = 500
default_pool_size = 40
; psycopg sends it; PgBouncer would otherwise refuse the connection.
ignore_startup_parameters = extra_float_digits
admin_users = idempotency
logfile = $PGBOUNCER_DIR/pgbouncer.log
pidfile = $PGBOUNCER_DIR/pgbouncer.pid
EOF
    if ((EUID == 0)); then
        # PgBouncer refuses to run as root.
        local user=postgres
        id "$user" >/dev/null 2>&1 || user=nobody
        chown -R "$user" "$PGBOUNCER_DIR"
        "$binary" -d -u "$user" "$PGBOUNCER_DIR/pgbouncer.ini"
    else
        "$binary" -d "$PGBOUNCER_DIR/pgbouncer.ini"
    fi
    for _ in $(seq 40); do
        pgbouncer_port_open "$PGBOUNCER_PORT" && return 0
        sleep 0.25
    done
    pgbouncer_log "not listening on 127.0.0.1:$PGBOUNCER_PORT after 10 s; its log:"
    tail -n 20 "$PGBOUNCER_DIR/pgbouncer.log" >&2 || true
    return 1
}

# Drop the runs' test database on PostgreSQL itself, ending PgBouncer's sessions on it.
pgbouncer_drop_test_database() {
    PGPASSWORD=idempotency psql -q -h 127.0.0.1 -p 5432 -U idempotency -d idempotency \
        -c "DROP DATABASE IF EXISTS $PGBOUNCER_TEST_DATABASE WITH (FORCE)"
}

run_tests_pgbouncer() {
    local tests=("${PGBOUNCER_TESTS[@]}")
    if [[ ${1:-} == --all ]]; then
        shift
        tests=(tests/)
    fi
    pgbouncer_up
    pgbouncer_drop_test_database
    local status=0
    DATABASE_URL=$PGBOUNCER_URL TEST_DATABASE_NAME=$PGBOUNCER_TEST_DATABASE \
        IDEMPOTENCY_TEST_PGBOUNCER=1 REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/1} \
        python3 dev.py test --reuse-db "${tests[@]}" "$@" || status=$?
    pgbouncer_drop_test_database
    return "$status"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    if [[ ${1:-} == test ]]; then
        shift
        run_tests_pgbouncer "$@"
    else
        pgbouncer_up
        echo "PgBouncer (transaction pooling) listens on 127.0.0.1:$PGBOUNCER_PORT:"
        echo "  $PGBOUNCER_URL"
    fi
fi
