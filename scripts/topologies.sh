#!/usr/bin/env bash
# The topology runs, outside the default suite and CI (docs/scaling.md): HAProxy in front of
# three gunicorn instances, on PostgreSQL, on MariaDB and with the CacheStore, and Redis
# Sentinel and Cluster. They start whole topologies and take minutes, which .ci/run's time
# budget has no room for, so the suite deselects the tests marked `topology` unless
# IDEMPOTENCY_TOPOLOGIES=1, which this script sets.
#
# Starts the services (scripts/services.sh, which installs HAProxy when missing, as root), then:
#   1. tests/test_multi_server.py on PostgreSQL (database store and CacheStore) and on MariaDB
#      (database store);
#   2. tests/test_redis_ha.py (Sentinel and Cluster, servers of its own);
#   3. benchmarks/multi_server.py on PostgreSQL, MariaDB and the CacheStore, each with a storm
#      in which an instance is killed.
# With IDEMPOTENCY_REQUIRE_SERVICES=1 nothing may be skipped for a missing service. Every step
# runs even if an earlier one failed; the exit status is non-zero if any step failed.
#
#   bash scripts/topologies.sh            # everything, about 4 minutes on 2 cores
#   bash scripts/topologies.sh --docs     # ...and write the benchmark's table to docs/scaling.md
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export IDEMPOTENCY_TOPOLOGIES=1
export IDEMPOTENCY_REQUIRE_SERVICES=1
export PYTHONUNBUFFERED=1
# Only the per-run commands below choose a database or Redis; nothing inherited may.
unset DATABASE_URL REDIS_URL TEST_DATABASE_NAME

# shellcheck source=scripts/services.sh
source scripts/services.sh

# Test databases and Redis databases of these runs' own, so that they can run beside the
# default suite (test_idempotency, Redis database 1). benchmarks/multi_server.py creates and
# drops test_idempotency_ms_postgresql and test_idempotency_ms_mariadb, and uses Redis
# database 12.
TOPOLOGIES_TEST_DATABASE=test_idempotency_ms_topologies
TOPOLOGIES_REDIS_URL=redis://127.0.0.1:6379/11
BENCHMARK_ARGS=("$@")

SUMMARY=()
FAILED=0
STARTED=$SECONDS

# step NAME COMMAND...: as in .ci/run, run one step in a subshell with errexit on, time it
# and record a summary line.
step() {
    local name=$1 started=$SECONDS status
    shift
    echo
    echo "::: $name"
    set +e
    (set -e; "$@")
    status=$?
    set -e
    local elapsed=$((SECONDS - started))
    local result="ok"
    if ((status != 0)); then
        result="FAILED (exit $status)"
        FAILED=1
    fi
    SUMMARY+=("$(printf '%-44s %-16s %4d s' "$name" "$result" "$elapsed")")
    echo "::: $name: $result in ${elapsed} s"
}

# -rP prints each storm's figures (requests/s, latencies, retries on another instance).
multi_server_postgresql() {
    DATABASE_URL=$POSTGRES_URL REDIS_URL=$TOPOLOGIES_REDIS_URL \
        TEST_DATABASE_NAME=$TOPOLOGIES_TEST_DATABASE \
        python3 dev.py test tests/test_multi_server.py --create-db -rP
}

# The CacheStore's storm does not depend on the database: it ran above already.
multi_server_mariadb() {
    DATABASE_URL=$MARIADB_URL REDIS_URL=$TOPOLOGIES_REDIS_URL \
        TEST_DATABASE_NAME=$TOPOLOGIES_TEST_DATABASE \
        python3 dev.py test tests/test_multi_server.py --create-db -rP -k database_store
}

redis_ha() {
    REDIS_URL=$TOPOLOGIES_REDIS_URL python3 dev.py test tests/test_redis_ha.py -rP
}

benchmark() {
    .venv/bin/python benchmarks/multi_server.py "${BENCHMARK_ARGS[@]}"
}

step "services (PostgreSQL, MariaDB, Redis, HAProxy)" services_up
step "multi-server tests on PostgreSQL" multi_server_postgresql
step "multi-server tests on MariaDB" multi_server_mariadb
step "Redis Sentinel and Cluster tests" redis_ha
step "multi-server benchmark (3 stores)" benchmark

echo
echo "::: summary"
printf '%s\n' "${SUMMARY[@]}"
echo "total: $((SECONDS - STARTED)) s"
if ((FAILED)); then
    echo "topologies failed"
    exit 1
fi
echo "topologies passed"
