"""``IDEMPOTENCY_DATABASE``, and a router that sends reads to a replica.

A replay or a claim read from a replica that lags would not see the key that the primary has
just completed, and would run the request a second time. So every read and write of keys that
the protocol makes goes to one database: ``IDEMPOTENCY_DATABASE``, else the router's choice for
*writing* ``IdempotencyKey``; never ``db_for_read``. The admin's lists may read the replica.

The last test proves it against a real streaming replica: a private PostgreSQL primary and a
replica of it made with ``pg_basebackup -R`` (tests/reliability_support.py), served by gunicorn
with tests/replica_settings.py. With the replica's replay paused (so it lacks every new key),
retries are still replayed, duplicates still run once, and the admin shows what the replica has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection
from django.http import JsonResponse
from django.test import RequestFactory

from django_idempotency.checks import check_database, check_settings, ensure_valid_settings
from django_idempotency.decorators import idempotent
from django_idempotency.models import IdempotencyKey, keys_database
from django_idempotency.stores import DatabaseStore
from tests.models import Charge
from tests.redis_support import Answer, assert_fresh_run, assert_replay_of, assert_store_unavailable
from tests.reliability_support import (
    ROOT,
    PrivatePostgres,
    PrivateReplica,
    Server,
    retry_until_done,
)


class KeysWrittenElsewhere:
    """A router that writes keys to ``keys-primary`` and reads them from ``keys-replica``."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return "keys-replica" if model._meta.app_label == "django_idempotency" else None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "keys-primary" if model._meta.app_label == "django_idempotency" else None


class NoKeyReadsFromTheReplica:
    """Fails any test in which the protocol asks the router where to *read* keys."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        if model._meta.app_label == "django_idempotency":
            raise AssertionError(f"{model.__name__} was read through db_for_read")
        return None


def test_the_keys_database_is_the_routers_database_for_writing_keys(settings):
    settings.DATABASE_ROUTERS = [f"{__name__}.KeysWrittenElsewhere"]

    assert keys_database() == "keys-primary"
    assert DatabaseStore()._alias() == "keys-primary"


def test_idempotency_database_wins_over_the_router(settings):
    settings.DATABASE_ROUTERS = [f"{__name__}.KeysWrittenElsewhere"]
    settings.IDEMPOTENCY_DATABASE = "default"

    assert keys_database() == "default"
    assert DatabaseStore()._alias() == "default"
    assert DatabaseStore().transaction_alias() == "default"


def test_without_routers_or_the_setting_keys_live_in_the_default_database():
    assert keys_database() == "default"


def test_a_database_not_in_databases_is_refused_with_the_configured_ones(settings):
    settings.IDEMPOTENCY_DATABASE = "replcia"

    [message] = [m for m in check_settings() if m.id == "django_idempotency.E025"]
    assert message.hint == "Configured databases: default."
    assert check_database(databases=["default"]) == []  # E025 says it; no second message
    with pytest.raises(ImproperlyConfigured, match=r"E025\) IDEMPOTENCY_DATABASE must be None"):
        ensure_valid_settings()  # what the first covered request of a server runs


@idempotent
def charge(request):
    created = Charge.objects.create(amount=7, note="replica")
    return JsonResponse({"charge": created.pk}, status=201)


@idempotent(atomic=False)
def charge_lease(request):
    created = Charge.objects.create(amount=7, note="replica")
    return JsonResponse({"charge": created.pk}, status=201)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("view", [charge, charge_lease], ids=["atomic", "lease"])
def test_claims_replays_and_purges_never_read_keys_through_the_router(settings, view):
    settings.DATABASE_ROUTERS = [f"{__name__}.NoKeyReadsFromTheReplica"]  # the default setting
    request = RequestFactory().post("/charges/", HTTP_IDEMPOTENCY_KEY="replica-1")
    request.user = AnonymousUser()

    first = view(request)
    retry = view(request)

    assert first.status_code == retry.status_code == 201
    assert retry.content == first.content
    assert Charge.objects.count() == 1
    call_command("purge_idempotency_keys", verbosity=0)
    assert IdempotencyKey.objects.using("default").count() == 1


# -- A real streaming replica ----------------------------------------------------------------


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[PrivatePostgres, PrivateReplica]]:
    primary = PrivatePostgres()
    replica = None
    try:
        migrated = subprocess.run(
            [sys.executable, "-m", "django", "migrate", "--run-syncdb", "-v", "0"],
            cwd=ROOT,
            env={
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "tests.reliability_settings",
                "RELIABILITY_DATABASE_URL": primary.url,
                "RELIABILITY_HOLD_DIR": str(primary.directory),
                "PYTHONPATH": str(ROOT),
            },
            check=False,
            capture_output=True,
            timeout=120,
        )
        assert migrated.returncode == 0, migrated.stderr.decode()[-3000:]
        replica = PrivateReplica(primary)
        yield primary, replica
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()


def _keys(server: PrivatePostgres) -> set[str]:
    return {key for (key,) in server._sql("SELECT key FROM django_idempotency_idempotencykey")}


def _key_reads(server: PrivatePostgres) -> int:
    """How many scans of the keys table ``server`` has run (its own statistics)."""
    [(scans,)] = server._sql(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables "
        "WHERE relname = 'django_idempotency_idempotencykey'"
    )
    return int(scans)


def _charges(server: PrivatePostgres, note: str) -> int:
    [(count,)] = server._sql(f"SELECT count(*) FROM tests_charge WHERE note = '{note}'")
    return int(count)


@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="runs in the PostgreSQL job only (it starts PostgreSQL servers of its own)",
)
def test_with_a_lagging_replica_claims_and_replays_read_the_primary_and_the_admin_the_replica(
    primary_and_replica, tmp_path
):
    primary, replica = primary_and_replica
    app = Server(
        tmp_path,
        workers=2,
        settings="tests.replica_settings",
        REPLICA_PRIMARY_URL=primary.url,
        REPLICA_REPLICA_URL=replica.url,
    )
    try:
        # (a) A request claims and completes on the primary; the replica follows.
        first = app.post("/effect/atomic/?note=a", "replica-a")
        assert_fresh_run(first)
        replica.caught_up_with(primary)
        assert "replica-a" in _keys(replica)

        # The replica stops replaying: from now on it lacks every new key.
        replica.pause()
        reads = _key_reads(replica)

        # (b) A retry is replayed although the replica does not have the key: the replay was
        # read on the primary. In both modes.
        for mode in ("atomic", "lease"):
            key, url = f"replica-b-{mode}", f"/effect/{mode}/?note=b-{mode}"
            done = app.post(url, key)
            assert_fresh_run(done)
            assert_replay_of(app.post(url, key), done)
            assert key in _keys(primary)
            assert _charges(primary, f"b-{mode}") == 1

        # (c) Two concurrent requests with one key: one runs, the other waits (409) and its
        # retry is replayed.
        answers: list[Answer] = []

        def send() -> None:
            answers.append(app.post("/effect/atomic/?note=c&sleep=0.5", "replica-c"))

        threads = [threading.Thread(target=send) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(answer.status for answer in answers) == [201, 409], answers
        [ran] = [answer for answer in answers if answer.status == 201]
        retried = retry_until_done(
            lambda: app.post("/effect/atomic/?note=c&sleep=0.5", "replica-c")
        )
        assert_replay_of(retried.final, ran)
        assert _charges(primary, "c") == 1
        assert _key_reads(replica) == reads  # not one read of keys on the replica
        assert _keys(replica) == {"replica-a"}  # and it has none of the keys used since

        # (d) The admin's list reads through the router: it shows what the replica has.
        listed = app.request("GET", "/admin-keys/")
        assert listed.status == 200, listed.content[-2000:]
        assert b"replica-a" in listed.content
        assert b"replica-c" not in listed.content
        replica.resume()
        replica.caught_up_with(primary)
        listed = app.request("GET", "/admin-keys/")
        assert b"replica-c" in listed.content

        # With the primary down, a covered request is answered 503 (it never falls back to
        # the replica, which would run it without protection) and its view does not run.
        primary.stop_server()
        down = app.post("/effect/atomic/?note=e", "replica-e")
        assert_store_unavailable(down)
        assert _charges(replica, "e") == 0
    finally:
        app.stop()
