#!/usr/bin/env bash
# Start PostgreSQL, MariaDB and Redis on 127.0.0.1 for the test suite, and create the role and
# database it uses. Safe to run again: a service already listening is left alone, and the role
# and databases are created only when missing.
#
# A service that is not listening and not installed is installed from Debian's packages
# (one `apt-get update`, one `apt-get install` for everything missing), so this needs root on
# a machine where something is missing. The redis-server executable is installed even when a
# Redis already listens, because the outage tests start servers of their own. There is no
# systemd on CI machines: each daemon is started directly.
#
#   bash scripts/services.sh        # start what is missing, then print the URLs to use
#   source scripts/services.sh      # only defines the URLs and functions (.ci/run does this)
set -euo pipefail

# One role and database for both servers, with a password: a fresh Debian PostgreSQL asks for
# one on 127.0.0.1 (scram-sha-256), and a fresh MariaDB's root only logs in over its socket.
SERVICES_DB_USER=idempotency
SERVICES_DB_PASSWORD=idempotency
SERVICES_DB_NAME=idempotency
POSTGRES_URL="postgres://${SERVICES_DB_USER}:${SERVICES_DB_PASSWORD}@127.0.0.1:5432/${SERVICES_DB_NAME}"
MARIADB_URL="mysql://${SERVICES_DB_USER}:${SERVICES_DB_PASSWORD}@127.0.0.1:3306/${SERVICES_DB_NAME}"
REDIS_SERVICE_URL="redis://127.0.0.1:6379/1"

services_log() { echo "services: $*"; }

# True when something accepts TCP connections on 127.0.0.1:PORT (bash's /dev/tcp, no extra tools).
port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Bounded wait for a port: 60 tries, half a second apart.
wait_for_port() {
    local name=$1 port=$2
    for _ in $(seq 60); do
        port_open "$port" && return 0
        sleep 0.5
    done
    services_log "$name is still not listening on 127.0.0.1:$port after 30 s"
    return 1
}

# Install, in one apt call, the servers that are down and missing, redis-server whenever it is
# missing, HAProxy whenever it is missing, plus what mysqlclient needs to build (it has no Linux
# wheel).
install_missing_packages() {
    local packages=()
    if ! port_open 5432 && ! command -v pg_ctlcluster >/dev/null; then
        packages+=(postgresql)
    fi
    if ! port_open 3306 && [[ ! -x /usr/sbin/mariadbd ]]; then
        packages+=(mariadb-server)
    fi
    # tests/test_redis_outage.py starts, kills and pauses redis-servers of its own.
    if ! command -v redis-server >/dev/null; then
        packages+=(redis-server)
    fi
    # scripts/topologies.sh puts HAProxy in front of three gunicorn instances
    # (tests/test_multi_server.py, benchmarks/multi_server.py).
    if ! command -v haproxy >/dev/null && [[ ! -x /usr/sbin/haproxy ]]; then
        packages+=(haproxy)
    fi
    local package
    for package in default-libmysqlclient-dev pkg-config; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
            packages+=("$package")
    done
    command -v cc >/dev/null || packages+=(gcc)
    if ((${#packages[@]} == 0)); then
        return 0
    fi
    if ((EUID != 0)); then
        services_log "missing: ${packages[*]}; run this script as root to install them"
        return 1
    fi
    services_log "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
}

start_postgresql() {
    port_open 5432 && return 0
    local version
    # The newest installed cluster version (15 on Debian 12); empty when there is none.
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -z $version ]]; then
        # The server package is there but its cluster was removed: make the default one.
        version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
        pg_createcluster "$version" main
    fi
    services_log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for_port PostgreSQL 5432
}

start_mariadb() {
    port_open 3306 && return 0
    services_log "starting MariaDB"
    # The socket directory lives on a tmpfs that is empty after a reboot.
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_for_port MariaDB 3306
}

start_redis() {
    port_open 6379 && return 0
    services_log "starting Redis"
    # Nothing the tests write needs to survive a restart: no snapshots, no append-only file.
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
        --dir /tmp --logfile /tmp/idempotency-redis.log
    wait_for_port Redis 6379
}

# The test role needs CREATEDB: pytest-django creates and drops test_<name> itself.
create_postgresql_database() {
    (cd / && runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d postgres) <<SQL
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '${SERVICES_DB_USER}') THEN
        CREATE ROLE ${SERVICES_DB_USER} LOGIN CREATEDB PASSWORD '${SERVICES_DB_PASSWORD}';
    END IF;
END
\$\$;
SELECT 'CREATE DATABASE ${SERVICES_DB_NAME} OWNER ${SERVICES_DB_USER}'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '${SERVICES_DB_NAME}')\gexec
SQL
}

# Grants cover the database and every test database named after it (test_idempotency,
# test_idempotency_<env> for parallel runs); `\_` keeps `_` from being a wildcard.
create_mariadb_database() {
    mariadb -uroot <<SQL
CREATE DATABASE IF NOT EXISTS \`${SERVICES_DB_NAME}\` CHARACTER SET utf8mb4;
CREATE USER IF NOT EXISTS '${SERVICES_DB_USER}'@'127.0.0.1' IDENTIFIED BY '${SERVICES_DB_PASSWORD}';
CREATE USER IF NOT EXISTS '${SERVICES_DB_USER}'@'localhost' IDENTIFIED BY '${SERVICES_DB_PASSWORD}';
GRANT ALL PRIVILEGES ON \`${SERVICES_DB_NAME}\`.* TO '${SERVICES_DB_USER}'@'127.0.0.1', '${SERVICES_DB_USER}'@'localhost';
GRANT ALL PRIVILEGES ON \`test\\_${SERVICES_DB_NAME}%\`.* TO '${SERVICES_DB_USER}'@'127.0.0.1', '${SERVICES_DB_USER}'@'localhost';
SQL
}

services_up() {
    install_missing_packages
    start_postgresql
    start_mariadb
    start_redis
    create_postgresql_database
    create_mariadb_database
    services_log "PostgreSQL, MariaDB and Redis are listening on 127.0.0.1"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    services_up
    cat <<EOF
Run the suite against them with:
  DATABASE_URL=$POSTGRES_URL REDIS_URL=$REDIS_SERVICE_URL python3 dev.py test
  DATABASE_URL=$MARIADB_URL REDIS_URL=$REDIS_SERVICE_URL python3 dev.py test
EOF
fi
