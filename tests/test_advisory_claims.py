"""Advisory claims (``DatabaseStore.claims``, docs/modes.md "Advisory claims").

With the plain-SQL statements, the atomic mode claims an absent key with two advisory locks
(PostgreSQL's transaction-level locks; MariaDB/MySQL's ``GET_LOCK``, the session's, released
after the transaction) and writes the key's row once, completed, in the commit that also
commits the view's writes. These tests race real threads against a real PostgreSQL or
MariaDB; the contract's answers under the same races (409 for the same request in flight, 422
for a different one, one run for 16 simultaneous duplicates, a killed worker) are asserted
by ``tests/test_concurrency.py``, which runs with advisory claims on both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from django_idempotency.checks import ensure_valid_settings
from django_idempotency.functions import idempotent_call
from django_idempotency.models import IdempotencyKey
from django_idempotency.records import ClaimRequest
from django_idempotency.stores import DatabaseStore
from django_idempotency.stores import database as database_store
from django_idempotency.stores import sql as sql_statements
from tests import race_views
from tests.models import Charge
from tests.test_concurrency import (
    TIMEOUT,
    Answer,
    Background,
    assert_fresh_run,
    assert_in_progress,
    assert_ran_once,
    assert_replay_of,
    atomic_requests,  # noqa: F401 (a fixture)
    new_client,
    new_key,
    new_note,
    post,
    post_different,
    race,
    target,
    while_in_flight,
)

pytestmark = [
    pytest.mark.concurrency,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor not in ("postgresql", "mysql"),
        reason="advisory claims need PostgreSQL or MariaDB: set DATABASE_URL to one",
    ),
]
postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="PostgreSQL's psycopg and transaction locks"
)
mariadb_only = pytest.mark.skipif(
    connection.vendor != "mysql", reason="MariaDB's GET_LOCK, whose locks are the session's"
)


class RowClaimsStore(DatabaseStore):
    """The claim row committed before the view, as on MariaDB: ``claims = "rows"``."""

    claims = "rows"


class MisspelledClaimsStore(DatabaseStore):
    claims = "advisory"  # type: ignore[assignment]


def key_row(key: str) -> tuple[str, int | None] | None:
    """The key's state and, on PostgreSQL, the id of the transaction that wrote its row
    version (InnoDB does not show it)."""
    writer = "xmin::text::bigint" if connection.vendor == "postgresql" else "NULL"
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT state, {writer} FROM django_idempotency_idempotencykey WHERE {KEY} = %s",
            [key],
        )
        return cursor.fetchone()


KEY = connection.ops.quote_name("key")


def assert_written_with_the_charge(key: str, note: str) -> None:
    """The key's row was written by the transaction that wrote the view's charge (compared on
    PostgreSQL; on MariaDB, both are there, and the rollback tests show they go together)."""
    found = key_row(key)
    assert found is not None
    assert Charge.objects.filter(note=note).count() == 1
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT xmin::text::bigint FROM tests_charge WHERE note = %s", [note])
            (writer,) = cursor.fetchone()
        assert found[1] == int(writer)


def test_an_in_flight_key_has_no_row_and_one_commit_writes_it_with_the_views_writes():
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note, sleep=1.0)
    in_flight, original = while_in_flight(url, key, note, lambda: key_row(key))

    assert in_flight is None  # held by advisory locks, not by a committed claim row
    assert_fresh_run(original)
    # Inserted completed by the transaction that wrote the view's charge: one row version,
    # one commit for both.
    assert key_row(key)[0] == "completed"
    assert_written_with_the_charge(key, note)
    assert_replay_of(post(new_client(), url, key), original)


def test_rows_claims_keep_an_in_flight_claim_row(settings):
    settings.IDEMPOTENCY_STORE = "tests.test_advisory_claims.RowClaimsStore"
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note, sleep=1.0)

    def row_and_duplicate() -> tuple[Any, Answer]:
        return key_row(key), post(new_client(), url, key)

    (in_flight, duplicate), original = while_in_flight(url, key, note, row_and_duplicate)

    assert in_flight is not None
    assert in_flight[0] == "in_progress"
    assert_in_progress(duplicate)
    assert_fresh_run(original)
    assert_written_with_the_charge(key, note)  # the claim row, updated in the view's
    assert race_views.runs(note) == 1


@pytest.fixture
def server_side_binding():
    """psycopg's server-side binding for every new connection (one statement per round trip)."""
    options = connections["default"].settings_dict.setdefault("OPTIONS", {})
    options["server_side_binding"] = True
    try:
        yield
    finally:
        del options["server_side_binding"]


@postgresql_only
@pytest.mark.usefixtures("server_side_binding")
def test_with_server_side_binding_the_locks_and_the_read_go_apart_and_still_run_once():
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note, sleep=0.3)

    answers = race(lambda client, _: post(client, url, key))

    assert_ran_once(answers, note)
    assert all(answer.status in (201, 409) for answer in answers), answers


@postgresql_only
@pytest.mark.usefixtures("server_side_binding")
def test_with_server_side_binding_a_different_request_in_flight_gets_422():
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note, sleep=1.0)
    other, original = while_in_flight(url, key, note, lambda: post_different(url, key))

    assert other.status_code == 422, other.content
    assert_fresh_run(original)
    assert race_views.runs(note) == 1


def test_two_keys_whose_lock_ids_collide_exclude_each_other_and_never_run_twice(monkeypatch):
    # A 64-bit collision, forced: every key gets the same two lock ids.
    monkeypatch.setattr(sql_statements, "advisory_lock_id", lambda values: len(values))
    first_key, second_key, note = new_key(), new_key(), new_note()
    url = target("/race/atomic/", note, sleep=1.0)
    excluded, original = while_in_flight(
        url, first_key, note, lambda: post(new_client(), url, second_key)
    )

    assert_in_progress(excluded)  # excluded while the other key is in flight...
    assert_fresh_run(original)
    retried = post(new_client(), url, second_key)
    assert_fresh_run(retried)  # ...and a key of its own once it has finished
    assert race_views.runs(note) == 2
    assert_replay_of(post(new_client(), url, first_key), original)


def test_a_lease_mode_claim_under_an_atomic_ones_locks_rolls_the_atomic_one_back():
    # The lease mode takes no advisory lock: a lease-mode view claiming the key of an
    # in-flight atomic-mode request inserts a row, and runs. The atomic one then cannot
    # store its response; it must not commit its writes either.
    key, atomic_note, lease_note = new_key(), new_note(), new_note()
    atomic_url = target("/race/atomic/", atomic_note, sleep=1.0)
    lease_url = target("/race/lease/", lease_note)
    lease, atomic = while_in_flight(
        atomic_url, key, atomic_note, lambda: post(new_client(), lease_url, key)
    )

    assert_fresh_run(lease)
    assert atomic.status == 503, atomic
    assert atomic.code == "idempotency_store_unavailable"
    assert Charge.objects.filter(note=atomic_note).count() == 0  # rolled back
    assert Charge.objects.filter(note=lease_note).count() == 1
    retry = new_client().post(
        atomic_url, {"amount": 7}, content_type="application/json", headers={"Idempotency-Key": key}
    )
    assert retry.status_code == 422  # the key now holds the lease-mode request's answer
    assert json.loads(retry.content)["code"] == "idempotency_key_mismatch"
    assert IdempotencyKey.objects.filter(key=key).count() == 1


def test_a_claims_value_that_is_not_auto_or_rows_fails_the_store_check(settings):
    settings.IDEMPOTENCY_STORE = "tests.test_advisory_claims.MisspelledClaimsStore"

    errors = [m for m in checks.run_checks() if m.id == "django_idempotency.E007"]

    assert [error.msg for error in errors] == [
        "IDEMPOTENCY_STORE names 'tests.test_advisory_claims.MisspelledClaimsStore', whose "
        "claims must be 'auto' or 'rows', not 'advisory' (str)."
    ]
    with pytest.raises(ImproperlyConfigured, match="claims must be 'auto' or 'rows'"):
        ensure_valid_settings()  # the first covered request, where no check ran


# -- The completed row and the COMMIT in one round trip --------------------------------------

KEYS_TABLE = connection.ops.quote_name("django_idempotency_idempotencykey")
#: Whether the completed row's INSERT and the COMMIT can go in one round trip: psycopg's
#: client-side binding can, Django's mysqlclient cannot (one statement at a time).
FUSES_COMMIT = connection.vendor == "postgresql"


def completions(queries: list[dict[str, str]]) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].startswith(f"INSERT INTO {KEYS_TABLE}")]


def first_execution(check_completion: Callable[[str], None]) -> None:
    """A first execution of the atomic race view, its completing INSERT checked by
    ``check_completion``, then the row it committed and a retry's replay."""
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note)

    with CaptureQueriesContext(connection) as captured:
        first = post(new_client(), url, key)

    assert_fresh_run(first)
    [completion] = completions(captured.captured_queries)
    check_completion(completion)
    assert_written_with_the_charge(key, note)
    assert_replay_of(post(new_client(), url, key), first)


@postgresql_only
def test_the_completed_row_and_the_commit_go_in_one_round_trip():
    def fused(completion: str) -> None:
        assert completion.endswith("; COMMIT")  # the row commits with the view's writes

    first_execution(fused)


def test_a_call_block_commits_with_its_result_when_it_ends_and_not_before(lock_names):
    with (
        CaptureQueriesContext(connection) as captured,
        idempotent_call("invoice-1", scope="billing") as call,
    ):
        Charge.objects.create(amount=1, note="saved")
        call.save({"sent": True})
        in_block = len(completions(captured.captured_queries))
        Charge.objects.create(amount=2, note="after the save")
    # save() inside the block did not commit: the block's later writes are in the same
    # transaction, which committed (with the result) when the block ended.
    [completion] = completions(captured.captured_queries)
    assert in_block == 1
    assert not completion.endswith("; COMMIT")
    assert Charge.objects.filter(note__in=["saved", "after the save"]).count() == 2

    def fails_after_its_save() -> None:
        with idempotent_call("invoice-2", scope="billing") as call:
            Charge.objects.create(amount=3, note="rolled back")
            call.save({"sent": True})
            raise KeyError("the block fails after its save")

    with pytest.raises(KeyError):
        fails_after_its_save()
    assert Charge.objects.filter(note="rolled back").count() == 0
    assert IdempotencyKey.objects.filter(key="invoice-2").count() == 0
    # The key is free again, for another session too (MariaDB: its locks were released).

    def claims_it_again() -> bool:
        with idempotent_call("invoice-2", scope="billing") as call:
            return call.claimed

    assert Background(claims_it_again).result() is True

    with (
        CaptureQueriesContext(connection) as captured,
        idempotent_call("invoice-3", scope="billing"),
    ):
        Charge.objects.create(amount=4, note="ends without a save")
    [completion] = completions(captured.captured_queries)
    assert completion.endswith("; COMMIT") is FUSES_COMMIT
    assert_written_with_the_charge("invoice-3", "ends without a save")
    if connection.vendor == "mysql":
        assert len(lock_names) == 6  # two for each of the three keys
    assert held(lock_names) == []  # every block's session locks are released


@postgresql_only
@pytest.mark.usefixtures("atomic_requests")
def test_under_atomic_requests_the_request_transaction_is_never_committed_early():
    def not_fused(completion: str) -> None:
        assert not completion.endswith("; COMMIT")  # Django commits the request's transaction

    first_execution(not_fused)


# -- MariaDB: GET_LOCK's locks are the session's ---------------------------------------------


@pytest.fixture
def lock_names(monkeypatch):
    """The GET_LOCK names the requests of the test take (and then release), in order."""
    names: list[str] = []
    original = sql_statements.MysqlStatements._key_lock_names

    def recording(self: sql_statements.MysqlStatements, claim: Any) -> list[str]:
        taken = original(self, claim)
        names.extend(name for name in taken if name not in names)
        return taken

    monkeypatch.setattr(sql_statements.MysqlStatements, "_key_lock_names", recording)
    return names


def held(names: list[str]) -> list[str]:
    """Those of ``names`` that some session holds, as another session sees them."""
    if not names:
        return []

    def look() -> list[str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT " + ", ".join(["IS_USED_LOCK(%s)"] * len(names)), names)
            return [
                name
                for name, owner in zip(names, cursor.fetchone(), strict=True)
                if owner is not None
            ]

    return list(Background(look).result())


@mariadb_only
@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
def test_the_sessions_locks_are_held_in_flight_and_released_when_the_request_ends(
    lock_names, fails
):
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note, sleep=0.5)
    if fails:
        race_views.fail_next_run(note)  # the view raises after writing its charge
    # The request runs in this thread, on its connection, which stays open after it: locks
    # left held would stay with it.
    in_flight, answer = while_in_flight_here(url, key, note, lambda: held(lock_names))

    assert len(lock_names) == 2
    assert in_flight == lock_names
    assert held(lock_names) == []
    if not fails:
        assert_fresh_run(answer)
        return
    assert answer.status == 500
    assert Charge.objects.filter(note=note).count() == 0
    # Another session claims the key at once, and runs the view.
    assert_fresh_run(Background(lambda: post(new_client(), url, key)).result())


def while_in_flight_here(
    url: str, key: str, note: str, during: Callable[[], list[str]]
) -> tuple[list[str], Answer]:
    """POST ``url`` with ``key`` in this thread; call ``during`` in another once the view runs."""

    def watch() -> list[str]:
        assert race_views.entered(note).wait(TIMEOUT), "the request never reached its view"
        return during()

    watcher = Background(watch)
    answer = post(new_client(), url, key)
    return list(watcher.result()), answer


@mariadb_only
@pytest.mark.usefixtures("atomic_requests")
def test_under_atomic_requests_mariadb_claims_with_rows(lock_names):
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note)

    first = post(new_client(), url, key)

    assert_fresh_run(first)
    assert lock_names == []  # the request's transaction outlives the store's: no GET_LOCK
    assert_replay_of(post(new_client(), url, key), first)


@pytest.fixture
def locks_refused(monkeypatch):
    """A server that refuses GET_LOCK, as a Galera cluster does (``WSREP_ON``): this statement
    fails with the same error, ER_NOT_SUPPORTED_YET (1235)."""
    monkeypatch.setattr(
        sql_statements.MysqlStatements,
        "_try_key_locks",
        "SELECT 1 FROM DUAL WHERE %s IN (SELECT %s LIMIT 1)",
    )
    monkeypatch.setattr(database_store, "_LOCKS_REFUSED", set())


@mariadb_only
@pytest.mark.usefixtures("locks_refused")
def test_a_server_that_refuses_get_lock_gets_row_claims_and_a_warning(caplog):
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note, sleep=1.0)

    def row_and_duplicate() -> tuple[Any, Answer]:
        return key_row(key), post(new_client(), url, key)

    with caplog.at_level("WARNING", logger="django_idempotency"):
        (in_flight, duplicate), original = while_in_flight(url, key, note, row_and_duplicate)

    assert in_flight is not None
    assert in_flight[0] == "in_progress"  # a claim row: row claims
    assert_in_progress(duplicate)
    assert_fresh_run(original)
    assert race_views.runs(note) == 1
    assert {"default"} == database_store._LOCKS_REFUSED
    assert "refused GET_LOCK" in caplog.text


def test_the_lock_names_of_one_key_differ_between_databases():
    claim = ClaimRequest(
        scope="s", key="k", fingerprint="f", method="POST", path="/", token="t", ttl=timedelta(1)
    )

    def names(database: str) -> list[str]:
        statements = sql_statements.MysqlStatements.__new__(sql_statements.MysqlStatements)
        statements.connection = SimpleNamespace(settings_dict={"NAME": database})  # type: ignore[assignment]
        return statements._key_lock_names(claim)

    first, other = names("orders"), names("orders_staging")
    assert len(set(first)) == 2
    assert not set(first) & set(other)  # GET_LOCK's names are the whole server's
    assert all(len(name) <= 64 for name in first + other)  # GET_LOCK's limit


# -- Where the second read could miss a committed row: row claims ------------------------------


@pytest.fixture
def repeatable_read():
    """REPEATABLE READ for every new connection: a snapshot per transaction, not per statement."""
    if connection.vendor == "postgresql":
        from psycopg import IsolationLevel

        level: Any = IsolationLevel.REPEATABLE_READ
    else:
        level = "repeatable read"
    options = connections["default"].settings_dict.setdefault("OPTIONS", {})
    options["isolation_level"] = level
    try:
        yield
    finally:
        del options["isolation_level"]


@pytest.mark.usefixtures("repeatable_read")
def test_above_read_committed_the_atomic_mode_claims_with_rows():
    # The second read's snapshot could be taken before the locks were won, and miss the row
    # their holder committed just before: duplicates. So no advisory claims there.
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note, sleep=1.0)

    def row_and_duplicate() -> tuple[Any, Answer]:
        return key_row(key), post(new_client(), url, key)

    (in_flight, duplicate), original = while_in_flight(url, key, note, row_and_duplicate)

    assert in_flight is not None
    assert in_flight[0] == "in_progress"  # a committed claim row
    assert_in_progress(duplicate)
    assert_fresh_run(original)
    assert race_views.runs(note) == 1


def test_with_autocommit_off_the_atomic_mode_claims_with_rows():
    store = DatabaseStore()
    assert store._advisory("default")
    connection.set_autocommit(False)
    try:
        assert not store._advisory("default")  # the store's transaction would not commit
    finally:
        connection.rollback()
        connection.set_autocommit(True)
