"""``purge_idempotency_keys`` and the QuerySet methods under it: ``purge()``, ``release_stale()``.

Rows are aged with ``Now()`` arithmetic in the database, because every deadline is compared
with the database's clock. Tests that hold a row lock from a second connection run only where
the database has row locks (PostgreSQL, MariaDB/MySQL).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError, close_old_connections, connection, transaction
from django.db.models.functions import Now
from django.db.models.signals import post_delete
from django.test.utils import CaptureQueriesContext

from django_idempotency import models as models_module
from django_idempotency.management.commands.purge_idempotency_keys import parse_duration
from django_idempotency.models import IdempotencyKey, IdempotencyKeyQuerySet
from tests.factories import IdempotencyKeyFactory

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
# The vendor, not connection.features: a feature of MariaDB is only known once connected,
# and this runs at import, before pytest-django allows database access.
needs_skip_locked = pytest.mark.skipif(
    connection.vendor not in ("postgresql", "mysql"),
    reason="needs row locks and SKIP LOCKED (PostgreSQL, MariaDB/MySQL)",
)


def expired_keys(count, *, ago=timedelta(hours=1), **traits):
    keys = IdempotencyKeyFactory.create_batch(count, completed=True, **traits)
    IdempotencyKey.objects.filter(pk__in=[key.pk for key in keys]).update(expires_at=Now() - ago)
    return keys


def age(key, **fields):
    """Set ``fields`` to ``Now() + offset`` in the database: ``age(key, expires_at=-hour)``."""
    IdempotencyKey.objects.filter(pk=key.pk).update(
        **{name: Now() + offset for name, offset in fields.items()}
    )


def remaining():
    return set(IdempotencyKey.objects.values_list("key", flat=True))


def purge(*args, **options):
    out, err = StringIO(), StringIO()
    call_command("purge_idempotency_keys", *args, stdout=out, stderr=err, **options)
    return out.getvalue()


# -- What is deleted ----------------------------------------------------------------------------


def test_purge_deletes_expired_keys_and_keeps_live_ones():
    live = IdempotencyKeyFactory(completed=True)
    expired_keys(3)

    assert IdempotencyKey.objects.purge() == 3

    assert remaining() == {live.key}


def test_purge_deletes_a_key_that_expired_a_moment_ago():
    key = IdempotencyKeyFactory(completed=True)
    # Not timedelta(0): SQLite keeps datetimes as text, and within one millisecond its
    # "now + 0" and "now" differ only in trailing zeros, which compare as later.
    age(key, expires_at=-timedelta(milliseconds=5))

    assert IdempotencyKey.objects.purge() == 1


@pytest.mark.parametrize("app_clock_offset", [timedelta(hours=-3), timedelta(hours=3)])
def test_purge_compares_expiry_on_the_database_clock(app_clock, app_clock_offset):
    ends_soon, ended = IdempotencyKeyFactory.create_batch(2, completed=True)
    age(ends_soon, expires_at=timedelta(hours=1))
    age(ended, expires_at=-timedelta(hours=1))
    app_clock(app_clock_offset)

    assert IdempotencyKey.objects.purge() == 1

    assert remaining() == {ends_soon.key}


def test_purge_keeps_an_expired_unfinished_key_whose_lease_still_runs():
    # A lease-mode request slower than its TTL: it still renews its lease, so it is in use.
    running = IdempotencyKeyFactory(in_progress=True)
    dead = IdempotencyKeyFactory(in_progress=True)
    age(running, expires_at=-timedelta(minutes=1), lease_until=timedelta(seconds=20))
    age(dead, expires_at=-timedelta(minutes=1), lease_until=-timedelta(seconds=1))

    assert IdempotencyKey.objects.purge() == 1

    assert remaining() == {running.key}


def test_purge_deletes_expired_unfinished_atomic_mode_keys_that_nothing_holds():
    key = IdempotencyKeyFactory()  # unfinished, no lease: the atomic mode
    age(key, expires_at=-timedelta(minutes=1))

    assert IdempotencyKey.objects.purge() == 1


def test_purge_keeps_keys_that_expired_less_than_older_than_ago():
    [recent] = expired_keys(1, ago=timedelta(hours=1))
    expired_keys(1, ago=timedelta(days=8))

    assert IdempotencyKey.objects.purge(older_than=timedelta(days=7)) == 1

    assert remaining() == {recent.key}


def test_purge_acts_on_the_queryset_it_is_called_on():
    mine = expired_keys(2, scope="user:1")
    [theirs] = expired_keys(1, scope="user:2")

    assert IdempotencyKey.objects.filter(scope="user:1").purge() == 2

    assert remaining() == {theirs.key}
    assert not {key.key for key in mine} & remaining()


def test_stale_leases_also_deletes_unfinished_keys_whose_request_died():
    lease_passed = IdempotencyKeyFactory(in_progress=True)
    age(lease_passed, lease_until=-timedelta(seconds=1))
    lease_running = IdempotencyKeyFactory(in_progress=True)
    old_atomic, new_atomic = IdempotencyKeyFactory.create_batch(2)  # no lease
    age(old_atomic, created_at=-timedelta(minutes=5))
    completed = IdempotencyKeyFactory(completed=True)

    assert IdempotencyKey.objects.purge() == 0
    assert IdempotencyKey.objects.purge(stale_leases=True) == 2

    assert remaining() == {lease_running.key, new_atomic.key, completed.key}


def test_an_atomic_mode_key_is_stale_after_the_lock_ttl(settings):
    key = IdempotencyKeyFactory()
    age(key, created_at=-timedelta(seconds=10))

    settings.IDEMPOTENCY_LOCK_TTL = timedelta(seconds=30)
    assert not IdempotencyKey.objects.stale().exists()
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(seconds=5)
    assert list(IdempotencyKey.objects.stale()) == [key]


def test_release_stale_deletes_only_stale_keys():
    stale = IdempotencyKeyFactory(in_progress=True)
    age(stale, lease_until=-timedelta(seconds=1))
    running = IdempotencyKeyFactory(in_progress=True)
    [expired] = expired_keys(1)

    assert IdempotencyKey.objects.release_stale() == 1

    assert remaining() == {running.key, expired.key}


def test_release_stale_in_batches():
    keys = IdempotencyKeyFactory.create_batch(3, in_progress=True)
    IdempotencyKey.objects.update(lease_until=Now() - timedelta(seconds=1))

    assert list(IdempotencyKey.objects.stale().purge_batches(stale_leases=True, batch_size=2)) == [
        2,
        1,
    ]
    assert not IdempotencyKey.objects.filter(pk__in=[key.pk for key in keys]).exists()


def test_release_stale_in_batches_of_one():
    IdempotencyKeyFactory.create_batch(3, in_progress=True)
    IdempotencyKey.objects.update(lease_until=Now() - timedelta(seconds=1))

    assert IdempotencyKey.objects.release_stale(batch_size=1) == 3


def test_without_skip_locked_only_leases_tell_a_stale_key(monkeypatch):
    # Row locks but no SKIP LOCKED: a held atomic-mode key looks like an abandoned one.
    monkeypatch.setattr(connection.features, "has_select_for_update", True)
    monkeypatch.setattr(connection.features, "has_select_for_update_skip_locked", False)
    lease = IdempotencyKeyFactory(in_progress=True)
    age(lease, lease_until=-timedelta(seconds=1))
    atomic = IdempotencyKeyFactory()
    age(atomic, created_at=-timedelta(minutes=5))

    assert IdempotencyKey.objects.release_stale() == 1

    assert remaining() == {atomic.key}


def test_purgeable_counts_what_a_purge_would_delete():
    expired_keys(2)
    stale = IdempotencyKeyFactory(in_progress=True)
    age(stale, lease_until=-timedelta(seconds=1))
    # Both expired and stale: counted once.
    both = IdempotencyKeyFactory(in_progress=True)
    age(both, lease_until=-timedelta(seconds=1), expires_at=-timedelta(seconds=1))

    assert IdempotencyKey.objects.purgeable().count() == 3
    assert IdempotencyKey.objects.purgeable(stale_leases=True).count() == 4


@pytest.mark.parametrize(
    "options",
    [{"batch_size": 0}, {"batch_size": -1}, {"batch_size": True}, {"older_than": -timedelta(1)}],
)
def test_purge_rejects_bad_arguments(options):
    with pytest.raises(ValueError, match=r"^(batch_size|older_than) must"):
        IdempotencyKey.objects.purge(**options)


# -- Batches ------------------------------------------------------------------------------------


def test_purge_deletes_in_batches_of_primary_keys():
    expired_keys(25)

    with CaptureQueriesContext(connection) as queries:
        batches = list(IdempotencyKey.objects.purge_batches(batch_size=10))

    assert batches == [10, 10, 5]
    deletes = [query["sql"] for query in queries if "DELETE FROM" in query["sql"]]
    assert len(deletes) == 3
    assert all(" IN (" in sql for sql in deletes)
    assert not IdempotencyKey.objects.exists()


on_postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="PostgreSQL's one-statement batch"
)


def _statements(queries):
    return [
        query["sql"]
        for query in queries
        if not query["sql"].startswith(("SAVEPOINT", "RELEASE SAVEPOINT", "BEGIN", "COMMIT"))
    ]


@on_postgresql
@pytest.mark.django_db(transaction=True)
def test_on_postgresql_a_batch_is_one_statement_that_does_not_wait_for_the_disk():
    expired_keys(3)

    with CaptureQueriesContext(connection) as queries:
        assert IdempotencyKey.objects.purge(batch_size=2) == 3

    statements = _statements(queries)
    assert statements[0] == "SET LOCAL synchronous_commit TO OFF"
    assert statements[1].startswith("WITH batch AS (SELECT")
    assert "FOR UPDATE SKIP LOCKED" in statements[1]
    assert len(statements) == 4


@on_postgresql
def test_inside_a_callers_transaction_its_commit_stays_synchronous():
    expired_keys(3)

    with CaptureQueriesContext(connection) as queries:
        assert IdempotencyKey.objects.purge(batch_size=2) == 3

    statements = _statements(queries)
    assert len(statements) == 2
    assert not any("synchronous_commit" in sql for sql in statements)


def test_delete_signals_are_sent_when_a_project_listens_for_them():
    deleted = []

    def receiver(sender, instance, **kwargs):
        deleted.append(instance.key)

    keys = expired_keys(3)
    post_delete.connect(receiver, sender=IdempotencyKey)
    try:
        assert IdempotencyKey.objects.purge(batch_size=2) == 3
    finally:
        post_delete.disconnect(receiver, sender=IdempotencyKey)

    assert sorted(deleted) == sorted(key.key for key in keys)


def test_a_full_last_batch_is_followed_by_one_empty_look():
    expired_keys(4)

    assert list(IdempotencyKey.objects.purge_batches(batch_size=2)) == [2, 2]


def test_batch_size_defaults_to_the_setting(settings):
    settings.IDEMPOTENCY_PURGE_BATCH_SIZE = 3
    expired_keys(7)

    assert list(IdempotencyKey.objects.purge_batches()) == [3, 3, 1]


def test_batches_follow_expiry_order_even_with_equal_expiry_times():
    keys = expired_keys(5)  # one UPDATE: all five expire at the same instant
    IdempotencyKey.objects.filter(pk=keys[0].pk).update(expires_at=Now() - timedelta(days=1))

    assert list(IdempotencyKey.objects.purge_batches(batch_size=2)) == [2, 2, 1]
    assert not IdempotencyKey.objects.exists()


def test_stopping_between_batches_keeps_what_was_done():
    expired_keys(5)

    batches = IdempotencyKey.objects.purge_batches(batch_size=2)
    assert next(batches) == 2
    batches.close()

    assert IdempotencyKey.objects.count() == 3
    assert IdempotencyKey.objects.purge() == 3


# -- Rows held by live requests (row locks) -----------------------------------------------------


class HoldRowLock:
    """Hold ``SELECT ... FOR UPDATE`` on one key from another connection, as a live request."""

    def __init__(self, pk):
        self.pk = pk
        self.locked, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        try:
            with transaction.atomic():
                IdempotencyKey.objects.select_for_update().get(pk=self.pk)
                self.locked.set()
                self.done.wait(10)
        finally:
            close_old_connections()
            connection.close()

    def __enter__(self):
        self.thread.start()
        assert self.locked.wait(10)
        return self

    def __exit__(self, *exc_info):
        self.done.set()
        self.thread.join(10)


@needs_skip_locked
@pytest.mark.django_db(transaction=True)
def test_purge_skips_an_expired_key_whose_row_a_live_request_locks():
    held, _free = expired_keys(2)

    with HoldRowLock(held.pk):
        assert IdempotencyKey.objects.purge(batch_size=1) == 1
        assert remaining() == {held.key}

    assert IdempotencyKey.objects.purge() == 1


@needs_skip_locked
@pytest.mark.django_db(transaction=True)
def test_stale_leases_skip_an_atomic_mode_key_whose_request_still_runs():
    running = IdempotencyKeyFactory()  # unfinished, no lease: held by its row lock
    age(running, created_at=-timedelta(minutes=5))

    with HoldRowLock(running.pk):
        assert IdempotencyKey.objects.purge(stale_leases=True) == 0
        assert IdempotencyKey.objects.release_stale() == 0

    assert IdempotencyKey.objects.release_stale() == 1


@needs_skip_locked
@pytest.mark.django_db(transaction=True)
def test_two_purges_at_once_delete_every_key_once():
    expired_keys(300)
    results, errors = [], []

    def run():
        try:
            results.append(IdempotencyKey.objects.purge(batch_size=7))
        except Exception as exc:  # pragma: no cover - reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    assert sum(results) == 300
    assert not IdempotencyKey.objects.exists()


# -- The command --------------------------------------------------------------------------------


def test_command_summary_says_how_many_and_how_long():
    expired_keys(3)

    out = purge()

    assert out.startswith("Deleted 3 expired idempotency keys in ")
    assert " s (" in out
    assert not IdempotencyKey.objects.exists()


def test_command_says_when_there_is_nothing_to_delete():
    IdempotencyKeyFactory(completed=True)

    assert purge() == "No expired idempotency keys.\n"
    assert IdempotencyKey.objects.count() == 1


def test_command_uses_thousands_separators():
    expired_keys(1001)

    assert purge("--batch-size", "600").startswith("Deleted 1,001 expired idempotency keys")


def test_command_prints_progress_per_batch_at_verbosity_2():
    expired_keys(5)

    out = purge("--batch-size", "2", verbosity=2)

    lines = out.splitlines()
    assert lines[0] == (
        "Purging idempotency keys that expired from database 'default', in batches of 2."
    )
    assert lines[1].startswith("Batch 1: deleted 2 keys; 2 so far, ")
    assert lines[2].startswith("Batch 2: deleted 2 keys; 4 so far, ")
    assert lines[3].startswith("Batch 3: deleted 1 key; 5 so far, ")
    assert all(line.endswith(("keys/s.", "instant.")) for line in lines[1:4])
    assert lines[4].startswith("Deleted 5 expired idempotency keys in ")
    assert len(lines) == 5


def test_command_is_silent_at_verbosity_0():
    expired_keys(2)

    assert purge("--batch-size", "1", verbosity=0) == ""
    assert not IdempotencyKey.objects.exists()


def test_dry_run_counts_and_deletes_nothing():
    expired_keys(2)
    stale = IdempotencyKeyFactory(in_progress=True)
    age(stale, lease_until=-timedelta(seconds=1))

    assert purge("--dry-run") == "Would delete 2 keys.\n"
    assert purge("--dry-run", "--stale-leases") == "Would delete 3 keys.\n"
    assert purge("--dry-run", verbosity=0) == ""
    assert IdempotencyKey.objects.count() == 3


def test_dry_run_says_key_for_one():
    expired_keys(1)

    assert purge("--dry-run") == "Would delete 1 key.\n"


def test_command_older_than_keeps_recently_expired_keys():
    [recent] = expired_keys(1, ago=timedelta(hours=1))
    expired_keys(2, ago=timedelta(hours=13))

    out = purge("--older-than", "12h", verbosity=2)

    assert out.startswith("Purging idempotency keys that expired at least 12:00:00 ago ")
    assert remaining() == {recent.key}


def test_command_accepts_older_than_as_a_timedelta():
    expired_keys(1, ago=timedelta(hours=1))

    assert purge(older_than=timedelta(hours=2)) == "No expired idempotency keys.\n"


def test_command_stale_leases():
    stale = IdempotencyKeyFactory(in_progress=True)
    age(stale, lease_until=-timedelta(seconds=1))
    expired_keys(1)

    out = purge("--stale-leases", verbosity=2)

    assert "and stale unfinished keys" in out.splitlines()[0]
    assert "Deleted 2 expired or stale idempotency keys in " in out
    assert not IdempotencyKey.objects.exists()


def test_command_purges_the_database_it_is_given():
    expired_keys(1)

    assert purge("--database", "default").startswith("Deleted 1 ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("45s", timedelta(seconds=45)),
        ("1d12h", timedelta(days=1, hours=12)),
        (" 7D ", timedelta(days=7)),
        ("0m", timedelta(0)),
    ],
)
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        (["--batch-size", "0"], {}, "--batch-size must be a positive integer, not 0."),
        (["--batch-size", "-5"], {}, "--batch-size must be a positive integer, not -5."),
        (["--batch-size", "ten"], {}, "--batch-size must be a positive integer, not 'ten'."),
        ([], {"batch_size": 0}, "--batch-size must be a positive integer, not 0."),
        (["--older-than", "7"], {}, "--older-than must be a duration such as 30m"),
        (["--older-than", "7x"], {}, "--older-than must be a duration such as 30m"),
        (["--older-than", "d7"], {}, "--older-than must be a duration such as 30m"),
        (["--older-than", ""], {}, "--older-than must be a duration such as 30m"),
        (["--older-than", "99999999999d"], {}, "--older-than must be a duration of at most"),
        (["--older-than", "36501d"], {}, "--older-than must be a duration of at most 36,500"),
        ([], {"older_than": -timedelta(1)}, "--older-than must not be negative"),
        (["--database", "nope"], {}, "--database: no database 'nope' (configured: default"),
    ],
)
def test_command_rejects_bad_options_with_a_clear_message(args, options, message):
    expired_keys(1)

    with pytest.raises(CommandError) as raised:
        purge(*args, **options)

    assert str(raised.value).startswith(message)
    assert raised.value.returncode == 1
    assert IdempotencyKey.objects.count() == 1


@pytest.mark.parametrize("value", [0, "100", None])
def test_command_rejects_a_bad_batch_size_setting(settings, value):
    settings.IDEMPOTENCY_PURGE_BATCH_SIZE = value

    with pytest.raises(CommandError, match="IDEMPOTENCY_PURGE_BATCH_SIZE must be a positive"):
        purge()


def test_command_exits_with_status_1_and_the_message_on_bad_options():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    result = subprocess.run(
        [sys.executable, "-m", "django", "purge_idempotency_keys", "--batch-size", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert "CommandError: --batch-size must be a positive integer, not 0." in result.stderr


def _interrupted_after_first_batch(monkeypatch, error):
    real = IdempotencyKeyQuerySet.purge_batches

    def purge_batches(self, **options):
        batches = real(self, **options)
        yield next(batches)
        raise error

    monkeypatch.setattr(IdempotencyKeyQuerySet, "purge_batches", purge_batches)


def test_interrupting_the_command_keeps_finished_batches(monkeypatch):
    expired_keys(5)
    _interrupted_after_first_batch(monkeypatch, KeyboardInterrupt())

    with pytest.raises(CommandError) as raised:
        purge("--batch-size", "2")

    assert raised.value.returncode == 130
    assert str(raised.value) == (
        "Interrupted after deleting 2 expired idempotency keys. Every finished batch is "
        "committed: run the command again to go on."
    )
    monkeypatch.undo()
    assert IdempotencyKey.objects.count() == 3
    assert purge().startswith("Deleted 3 ")


def test_a_database_error_stops_the_command_with_status_1(monkeypatch):
    expired_keys(3)
    _interrupted_after_first_batch(monkeypatch, OperationalError("server closed the connection"))

    with pytest.raises(CommandError) as raised:
        purge("--batch-size", "1")

    assert raised.value.returncode == 1
    assert str(raised.value) == (
        "Stopped after deleting 1 expired idempotency key: server closed the connection"
    )


def test_a_database_error_during_a_dry_run_is_a_command_error(monkeypatch):
    def count(self):
        raise OperationalError("no such table")

    monkeypatch.setattr(IdempotencyKeyQuerySet, "count", count)

    with pytest.raises(CommandError, match=r"^Could not count the keys: no such table$"):
        purge("--dry-run")


def test_running_twice_is_safe():
    expired_keys(2)

    assert purge().startswith("Deleted 2 ")
    assert purge() == "No expired idempotency keys.\n"


# -- Deadlocks ----------------------------------------------------------------------------------


def _deadlock_error(cause):
    error = OperationalError("deadlock detected")
    error.__cause__ = cause
    return error


class _PostgresDeadlock(Exception):
    sqlstate = "40P01"


@pytest.mark.parametrize(
    ("cause", "is_deadlock"),
    [
        (_PostgresDeadlock(), True),
        (Exception(1213, "Deadlock found when trying to get lock"), True),
        (Exception(1205, "Lock wait timeout exceeded"), False),
        (Exception(), False),
        (None, False),
    ],
)
def test_deadlocks_are_recognised(cause, is_deadlock):
    assert models_module._deadlock(_deadlock_error(cause)) is is_deadlock


def _deadlocking(monkeypatch, times):
    real, calls = models_module._delete_batch, []

    def delete_batch(*args):
        calls.append(args)
        if len(calls) <= times:
            raise _deadlock_error(_PostgresDeadlock())
        return real(*args)

    monkeypatch.setattr(models_module, "_delete_batch", delete_batch)
    return calls


@pytest.mark.django_db(transaction=True)
def test_a_batch_that_a_deadlock_rolled_back_is_tried_again(monkeypatch):
    expired_keys(3)
    calls = _deadlocking(monkeypatch, times=2)

    assert IdempotencyKey.objects.purge() == 3
    assert len(calls) == 3


@pytest.mark.django_db(transaction=True)
def test_a_batch_is_tried_five_times_at_most(monkeypatch):
    expired_keys(1)
    calls = _deadlocking(monkeypatch, times=5)

    with pytest.raises(OperationalError, match="deadlock"):
        IdempotencyKey.objects.purge()
    assert len(calls) == 5
    assert IdempotencyKey.objects.count() == 1


def test_a_deadlock_inside_a_callers_transaction_is_not_retried(monkeypatch):
    expired_keys(1)
    calls = _deadlocking(monkeypatch, times=1)

    with pytest.raises(OperationalError, match="deadlock"):
        IdempotencyKey.objects.purge()
    assert len(calls) == 1


def test_other_database_errors_are_not_retried(monkeypatch):
    def delete_batch(*args):
        raise OperationalError("server closed the connection")

    monkeypatch.setattr(models_module, "_delete_batch", delete_batch)

    with pytest.raises(OperationalError, match="server closed"):
        IdempotencyKey.objects.purge()
