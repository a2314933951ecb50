"""Database faults: the request's connection killed mid-request, the database restarted under load.

docs/contract.md, "Answers": "the store is unreachable → 503, never run the view unprotected";
the atomic mode's writes and stored response commit together or not at all. Here the faults are
real:

* the connection of the gunicorn worker running a view is terminated by the database server
  (``pg_terminate_backend`` on PostgreSQL, ``KILL CONNECTION`` on MariaDB) while the view is
  held inside, before or after its effect. The client retries until it gets its answer.
* a PostgreSQL server of the test's own (``initdb`` into a temporary directory, so the shared
  server is never touched) is restarted with ``pg_ctl restart -m fast``, and then stopped for
  a second and started again, while 8 clients send 60 operations and retry them.

Afterwards each operation's effect exists exactly once, no key row is half-written (a row is
either completed with its response or unfinished without one), every 5xx the clients saw was a
clear answer, and the service is whole again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection

from django_idempotency.models import IdempotencyKey
from tests.assertions import BEHIND_PGBOUNCER
from tests.models import Charge
from tests.redis_support import Answer, assert_fresh_run, assert_replay_of
from tests.reliability_support import (
    ROOT,
    Outcome,
    PrivatePostgres,
    Server,
    retry_until_done,
    worker_database_url,
)

LEASE_SECONDS = 2.0

row_locks = pytest.mark.skipif(
    not connection.features.has_select_for_update,
    reason="needs a database the gunicorn workers share, with row locks: PostgreSQL or MariaDB",
)


def assert_whole(row: Any) -> None:
    """A key row is completed with its response, or unfinished without one: never between."""
    if row.state == IdempotencyKey.State.COMPLETED:
        assert row.response_status is not None, row
        assert row.completed_at is not None, row
    else:
        assert row.state == IdempotencyKey.State.IN_PROGRESS, row
        assert (row.response_status, row.response_body, row.completed_at) == (None, None, None)


def clear_5xx(answer: Answer | str) -> bool:
    """A 5xx a client can act on: our 503 with ``Retry-After``, or Django's plain 500."""
    if isinstance(answer, str) or answer.status < 500:
        return True
    if answer.status == 503:
        return answer.code == "idempotency_store_unavailable" and "Retry-After" in answer.headers
    return answer.status == 500


# -- The request's connection terminated -----------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, django_db_setup) -> Iterator[Server]:
    if not connection.features.has_select_for_update:
        pytest.skip("needs PostgreSQL or MariaDB")
    server = Server(
        tmp_path_factory.mktemp("db-faults"),
        RELIABILITY_DATABASE_URL=worker_database_url(),
        RELIABILITY_LOCK_TTL=str(LEASE_SECONDS),
    )
    try:
        yield server
    finally:
        server.stop()


#: Behind PgBouncer in transaction pooling, a lease-mode request holds a server session only
#: for each of its short transactions: between them there is no session of its own to
#: terminate. (The atomic mode holds one for the whole view, and is tested there too.)
NEEDS_OWN_SESSION = pytest.mark.skipif(
    BEHIND_PGBOUNCER,
    reason="behind PgBouncer a lease-mode request has no server session of its own to kill",
)


def terminate_the_other_connections() -> int:
    """Terminate every other session on the test database: the held worker's, here."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                "datname = current_database() AND pid <> pg_backend_pid()"
            )
            return len(cursor.fetchall())
        cursor.execute(
            "SELECT id FROM information_schema.processlist "
            "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
        )
        ids = [row[0] for row in cursor.fetchall()]
        for thread_id in ids:
            cursor.execute(f"KILL CONNECTION {int(thread_id)}")
        return len(ids)


def terminate_mid_request(server: Server, url: str, note: str, key: str, where: str) -> Outcome:
    server.hold(note, where)
    outcome = Outcome()
    client = threading.Thread(
        target=retry_until_done,
        args=(lambda: server.post(url, key),),
        kwargs={"outcome": outcome, "deadline": 30},
        daemon=True,
    )
    client.start()
    server.wait_inside(note)
    terminated = terminate_the_other_connections()
    if BEHIND_PGBOUNCER:
        # PgBouncer's idle server connections to the database are terminated too (it opens
        # new ones): the held worker's is one of them.
        assert terminated >= 1
    else:
        assert terminated == 1
    server.release(note)
    client.join(40)
    assert not client.is_alive()
    return outcome


@row_locks
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("mode", "where", "first_status"),
    [
        # The view's writes and the claim roll back with the dead transaction: 503, or a
        # 500 when the view itself hit the dead connection.
        pytest.param("atomic", "before", 500, id="atomic-before-effect"),
        pytest.param("atomic", "after", 503, id="atomic-after-effect"),
        # The view's own write fails: 500, and the claim stays until its lease passes.
        pytest.param("lease", "before", 500, id="lease-before-effect", marks=NEEDS_OWN_SESSION),
    ],
)
def test_connection_terminated_mid_request_leaves_one_effect_and_whole_rows(
    server, mode, where, first_status
):
    note, key = uuid.uuid4().hex[:12], f"terminated-{uuid.uuid4()}"
    url = f"/effect/{mode}/?note={note}"

    outcome = terminate_mid_request(server, url, note, key, where)

    first = outcome.answers[0]
    assert isinstance(first, Answer), outcome.answers
    assert first.status == first_status, outcome.answers
    assert all(clear_5xx(answer) for answer in outcome.answers), outcome.answers
    final = outcome.final
    assert_fresh_run(final)
    assert Charge.objects.filter(note=note).count() == 1
    row = IdempotencyKey.objects.get(key=key)
    assert_whole(row)
    assert row.state == IdempotencyKey.State.COMPLETED
    assert_replay_of(server.post(url, key), final)


@NEEDS_OWN_SESSION
@row_locks
@pytest.mark.django_db(transaction=True)
def test_lease_mode_connection_lost_after_the_effect_is_the_documented_rerun(server):
    # docs/modes.md, the lease mode's trade-offs: the view's effect committed, its response
    # could not be stored. The client gets the view's answer; the unfinished claim holds
    # retries off for its lease; a retry after that runs the view again.
    note, key = uuid.uuid4().hex[:12], f"terminated-{uuid.uuid4()}"
    url = f"/effect/lease/?note={note}"

    outcome = terminate_mid_request(server, url, note, key, "after")

    assert_fresh_run(outcome.final)
    assert len(outcome.answers) == 1
    row = IdempotencyKey.objects.get(key=key)
    assert_whole(row)
    assert row.state == IdempotencyKey.State.IN_PROGRESS
    assert server.post(url, key).status == 409
    retry = retry_until_done(lambda: server.post(url, key), deadline=10)
    assert_fresh_run(retry.final)
    assert Charge.objects.filter(note=note).count() == 2


# -- A private PostgreSQL restarted under load -----------------------------------------------

LOAD_CLIENTS = 8
LOAD_OPERATIONS = 60


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        migrated = subprocess.run(
            [sys.executable, "-m", "django", "migrate", "--run-syncdb", "-v", "0"],
            cwd=ROOT,
            env={
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "tests.reliability_settings",
                "RELIABILITY_DATABASE_URL": server.url,
                "RELIABILITY_HOLD_DIR": str(server.directory),
                "PYTHONPATH": str(ROOT),
            },
            check=False,
            capture_output=True,
            timeout=120,
        )
        assert migrated.returncode == 0, migrated.stderr.decode()[-3000:]
        yield server
    finally:
        server.stop()


def _query(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url.replace("postgres://", "postgresql://"), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="runs in the PostgreSQL job only (it starts a PostgreSQL server of its own)",
)
def test_database_restarted_under_load_loses_nothing_and_duplicates_nothing(
    private_postgres, tmp_path
):
    app = Server(
        tmp_path,
        workers=4,
        RELIABILITY_DATABASE_URL=private_postgres.url,
        RELIABILITY_LOCK_TTL=str(LEASE_SECONDS),
    )
    operations = [
        (uuid.uuid4().hex[:12], f"restart-{uuid.uuid4()}") for _ in range(LOAD_OPERATIONS)
    ]
    outcomes: dict[str, Outcome] = {note: Outcome() for note, _ in operations}
    queue = list(operations)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                note, key = queue.pop()
            url = f"/effect/atomic/?note={note}&sleep=0.05"
            retry_until_done(
                lambda url=url, key=key: app.post(url, key),
                pause=0.2,
                deadline=60,
                outcome=outcomes[note],
            )
            time.sleep(0.1)

    try:
        threads = [threading.Thread(target=client, daemon=True) for _ in range(LOAD_CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        private_postgres.restart()  # every session terminated, then back
        time.sleep(0.5)
        private_postgres.stop_server()  # down for a second: clients get 503s
        time.sleep(1.0)
        private_postgres.start()
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads)

        answers = [answer for outcome in outcomes.values() for answer in outcome.answers]
        seen = Counter(
            answer if isinstance(answer, str) else f"{answer.status} {answer.code or ''}"
            for answer in answers
        )
        print(f"restart under load: {LOAD_OPERATIONS} operations, answers {dict(seen)}")
        assert all(clear_5xx(answer) for answer in answers), seen
        assert any(key.startswith("503") for key in seen), f"the outage was not seen: {seen}"
        # Full service after: each operation got its own answer, and replays now.
        for note, _ in operations:
            final = outcomes[note].final
            assert final.status == 201, outcomes[note].answers
            assert json.loads(final.content)["note"] == note
        effects = dict(
            _query(private_postgres.url, "SELECT note, count(*) FROM tests_charge GROUP BY note")
        )
        assert effects == {note: 1 for note, _ in operations}
        rows = _query(
            private_postgres.url,
            "SELECT state, response_status IS NULL, response_body IS NULL, completed_at IS NULL "
            "FROM django_idempotency_idempotencykey",
        )
        assert len(rows) == LOAD_OPERATIONS
        assert set(rows) == {("completed", False, False, False)}
        note, key = operations[0]
        replay = app.post(f"/effect/atomic/?note={note}&sleep=0.05", key)
        assert replay.replayed
        assert replay.content == outcomes[note].final.content
    finally:
        app.stop()
