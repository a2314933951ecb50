"""PostgreSQL's advisory claims (``DatabaseStore.claims``, docs/modes.md "Advisory claims").

On PostgreSQL with the plain-SQL statements, the atomic mode claims an absent key with two
transaction-level advisory locks and writes the key's row once, completed, in the commit that
also commits the view's writes. These tests race real threads against a real PostgreSQL; the
contract's answers under the same races (409 for the same request in flight, 422 for a
different one, one run for 16 simultaneous duplicates, a killed worker) are asserted by
``tests/test_concurrency.py``, which runs with advisory claims on PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from django_idempotency.checks import ensure_valid_settings
from django_idempotency.functions import idempotent_call
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import DatabaseStore
from django_idempotency.stores import sql as sql_statements
from tests import race_views
from tests.models import Charge
from tests.test_concurrency import (
    Answer,
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
        connection.vendor != "postgresql",
        reason="advisory claims are PostgreSQL's: set DATABASE_URL to a PostgreSQL server",
    ),
]


class RowClaimsStore(DatabaseStore):
    """The claim row committed before the view, as on MariaDB: ``claims = "rows"``."""

    claims = "rows"


class MisspelledClaimsStore(DatabaseStore):
    claims = "advisory"  # type: ignore[assignment]


def key_row(key: str) -> tuple[str, int] | None:
    """The key's state and the id of the transaction that wrote its row version."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT state, xmin::text::bigint FROM django_idempotency_idempotencykey "
            "WHERE key = %s",
            [key],
        )
        return cursor.fetchone()


def charge_writer(note: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT xmin::text::bigint FROM tests_charge WHERE note = %s", [note])
        (writer,) = cursor.fetchone()
        return int(writer)


def test_an_in_flight_key_has_no_row_and_one_commit_writes_it_with_the_views_writes():
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note, sleep=1.0)
    in_flight, original = while_in_flight(url, key, note, lambda: key_row(key))

    assert in_flight is None  # held by advisory locks, not by a committed claim row
    assert_fresh_run(original)
    state, writer = key_row(key)
    # Inserted completed by the transaction that wrote the view's charge: one row version,
    # one commit for both.
    assert state == "completed"
    assert writer == charge_writer(note)
    assert_replay_of(post(new_client(), url, key), original)


def test_rows_claims_keep_an_in_flight_claim_row_on_postgresql(settings):
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
    assert key_row(key)[1] == charge_writer(note)  # the claim row, updated in the view's
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


@pytest.mark.usefixtures("server_side_binding")
def test_with_server_side_binding_the_locks_and_the_read_go_apart_and_still_run_once():
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note, sleep=0.3)

    answers = race(lambda client, _: post(client, url, key))

    assert_ran_once(answers, note)
    assert all(answer.status in (201, 409) for answer in answers), answers


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

KEYS_TABLE = '"django_idempotency_idempotencykey"'


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
    assert key_row(key)[1] == charge_writer(note)
    assert_replay_of(post(new_client(), url, key), first)


def test_the_completed_row_and_the_commit_go_in_one_round_trip():
    def fused(completion: str) -> None:
        assert completion.endswith("; COMMIT")  # the row commits with the view's writes

    first_execution(fused)


def test_a_call_block_commits_with_its_result_when_it_ends_and_not_before():
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

    with (
        CaptureQueriesContext(connection) as captured,
        idempotent_call("invoice-3", scope="billing"),
    ):
        Charge.objects.create(amount=4, note="ends without a save")
    [completion] = completions(captured.captured_queries)
    assert completion.endswith("; COMMIT")
    assert key_row("invoice-3")[1] == charge_writer("ends without a save")


@pytest.mark.usefixtures("atomic_requests")
def test_under_atomic_requests_the_request_transaction_is_never_committed_early():
    def not_fused(completion: str) -> None:
        assert not completion.endswith("; COMMIT")  # Django commits the request's transaction

    first_execution(not_fused)
