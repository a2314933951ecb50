"""The suite's PostgreSQL connections really go through PgBouncer in transaction pooling mode.

Runs (and counts) only in the run of scripts/pgbouncer.sh, which .ci/run makes: there the
contract, concurrency and crash tests listed in that script use PgBouncer on 127.0.0.1:6432.
This test makes sure that run is what it claims to be (docs/scaling.md).
"""

from __future__ import annotations

import pytest
from django.db import connection

from tests.assertions import BEHIND_PGBOUNCER

pytestmark = [
    pytest.mark.skipif(
        not BEHIND_PGBOUNCER, reason="only in the PgBouncer run (bash scripts/pgbouncer.sh test)"
    ),
    pytest.mark.django_db(transaction=True),
]


def _pgbouncer_setting(name: str) -> str:
    import psycopg

    settings = connection.settings_dict
    with psycopg.connect(
        host=settings["HOST"],
        port=settings["PORT"],
        user=settings["USER"],
        password=settings["PASSWORD"],
        dbname="pgbouncer",  # PgBouncer's admin console
        autocommit=True,
        prepare_threshold=None,
    ) as console:
        rows = console.execute("SHOW CONFIG").fetchall()
    return next(str(row[1]) for row in rows if row[0] == name)


def test_the_connections_reach_postgresql_through_pgbouncer():
    with connection.cursor() as cursor:
        cursor.execute("SELECT inet_server_port()")
        [(server_port,)] = cursor.fetchall()

    assert int(connection.settings_dict["PORT"]) == 6432  # the client's side: PgBouncer
    assert server_port == 5432  # the session's side: PostgreSQL itself
    assert _pgbouncer_setting("pool_mode") == "transaction"
