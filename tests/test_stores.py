"""The database store when its database goes away mid-request, and its column limits.

Every test runs with each of the store's statement strategies (the ``statements`` fixture):
the plain SQL of PostgreSQL and MariaDB/MySQL, and the ORM.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections
from django.db.models.functions import Now
from django.http import JsonResponse
from django.test import RequestFactory

from django_idempotency.conf import get_store
from django_idempotency.core import Execution
from django_idempotency.decorators import idempotent
from django_idempotency.exceptions import StoreUnavailable
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import (
    ClaimRequest,
    DatabaseStore,
    KeyLocked,
    KeyVanished,
    StoredResponse,
)
from django_idempotency.stores.sql import row_record
from tests.conftest import OFFLINE_ALIAS
from tests.models import Charge

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("statements")]


class SwitchableStore(DatabaseStore):
    """The database store, whose database a test can take away while a view runs."""


@pytest.fixture
def store(settings, offline_store):
    # offline_store adds the unreachable alias; this store starts on the real database.
    settings.IDEMPOTENCY_STORE = "tests.test_stores.SwitchableStore"
    store = get_store()
    store.using = None
    yield store
    store.using = None


def post(view, key="k-1", **extra):
    request = RequestFactory().post(
        "/charges/",
        json.dumps({"amount": 5}),
        content_type="application/json",
        headers={"Idempotency-Key": key},
        **extra,
    )
    return view(request)


def charging_view_that_loses_the_store(store):
    def view(request):
        charge = Charge.objects.create(amount=5)
        store.using = OFFLINE_ALIAS  # the key database goes away while the view runs
        return JsonResponse({"id": charge.pk}, status=201)

    return view


def test_atomic_mode_answers_503_and_rolls_back_when_the_response_cannot_be_stored(store):
    view = idempotent(charging_view_that_loses_the_store(store))

    response = post(view)

    assert response.status_code == 503
    assert response["Content-Type"] == "application/problem+json"
    assert json.loads(response.content)["code"] == "idempotency_store_unavailable"
    assert response["Retry-After"] == "1"
    assert Charge.objects.count() == 0  # nothing happened, as the 503 says


def test_lease_mode_returns_the_views_answer_when_the_response_cannot_be_stored(store, caplog):
    view = idempotent(atomic=False)(charging_view_that_loses_the_store(store))

    with caplog.at_level(logging.ERROR, logger="django_idempotency"):
        response = post(view)

    # The view ran and committed: its answer is the truth, not a 503.
    assert response.status_code == 201
    assert Charge.objects.count() == 1
    assert "Could not store the response" in caplog.text
    # The claim stays, so retries are held off until its lease passes.
    row = IdempotencyKey.objects.get()
    assert row.state == IdempotencyKey.State.IN_PROGRESS
    assert row.lease_until is not None


def test_heartbeat_keeps_beating_after_a_failed_renewal(store, settings, caplog):
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(milliseconds=300)
    renewed = threading.Event()

    def view(request):
        store.using = OFFLINE_ALIAS  # renewals fail...
        threading.Event().wait(0.25)
        store.using = None  # ...then succeed again
        renewed.wait(timeout=5)
        return JsonResponse({}, status=201)

    original_renew = DatabaseStore.renew

    def renew(self, claim, *, lease):
        result = original_renew(self, claim, lease=lease)
        if result:
            renewed.set()
        return result

    SwitchableStore.renew = renew
    try:
        with caplog.at_level(logging.WARNING, logger="django_idempotency"):
            response = post(idempotent(atomic=False)(view))
    finally:
        del SwitchableStore.renew

    assert response.status_code == 201
    assert renewed.is_set()
    assert "Could not renew the lease" in caplog.text


def test_overlong_custom_fingerprint_is_stored_as_its_digest(settings):
    settings.IDEMPOTENCY_FINGERPRINT = "tests.test_stores.overlong_fingerprint"
    view = idempotent(lambda request: JsonResponse({}, status=201))

    first = post(view)
    replay = post(view)

    assert first.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert len(IdempotencyKey.objects.get().fingerprint) == 64


def overlong_fingerprint(request) -> str:
    return request.method + ":" + "x" * 500


def test_keys_and_scopes_are_compared_exactly_on_every_database():
    store = DatabaseStore()
    claims = [
        ClaimRequest(
            scope=scope,
            key=key,
            fingerprint="f",
            method="POST",
            path="/",
            token=f"t{n}",
            ttl=timedelta(hours=1),
        )
        for n, (scope, key) in enumerate(
            [("acme", "abc"), ("acme", "ABC"), ("acme", "abc "), ("ACME", "abc")]
        )
    ]

    owners = [store.claim(claim, lease=timedelta(seconds=30)).owner_token for claim in claims]

    assert owners == ["t0", "t1", "t2", "t3"]  # four keys, each claimed by its own request
    assert IdempotencyKey.objects.count() == 4


def test_execution_outside_a_covered_request_does_nothing():
    execution = Execution()
    request = RequestFactory().get("/")

    assert execution.begin(request) is None
    response = JsonResponse({})
    assert execution.finish(request, response) is response
    assert IdempotencyKey.objects.count() == 0


@pytest.mark.parametrize(
    ("state", "expires_in", "lease"),
    [
        pytest.param(IdempotencyKey.State.COMPLETED, timedelta(hours=1), None, id="completed"),
        pytest.param(IdempotencyKey.State.COMPLETED, -timedelta(seconds=5), None, id="expired"),
        pytest.param(IdempotencyKey.State.IN_PROGRESS, timedelta(hours=1), None, id="atomic"),
        pytest.param(
            IdempotencyKey.State.IN_PROGRESS, timedelta(hours=1), timedelta(seconds=20), id="lease"
        ),
        pytest.param(
            IdempotencyKey.State.IN_PROGRESS, timedelta(hours=1), -timedelta(seconds=3), id="late"
        ),
    ],
)
def test_store_reads_a_record_as_the_orm_does(state, expires_in, lease):
    """PostgreSQL and MySQL read keys with plain SQL: the record must be the ORM's."""
    completed = state == IdempotencyKey.State.COMPLETED
    IdempotencyKey.objects.create(
        scope="user:1",
        key="k-1",
        state=state,
        fingerprint="f" * 64,
        method="POST",
        path="/charges/",
        owner_token="t" * 32,
        response_status=201 if completed else None,
        response_headers=[["Content-Type", "application/json"], ["X-Ünïcode", "é"]],
        response_body=b'{"id": 1}\x00\xff' if completed else None,
        expires_at=Now() + expires_in,
        lease_until=None if lease is None else Now() + lease,
    )
    row = IdempotencyKey.objects.annotate(db_now=Now()).get()
    expected = row_record(row)

    record = DatabaseStore().get(scope="user:1", key="k-1")

    assert record is not None
    assert record.response == expected.response
    assert (record.fingerprint, record.state, record.owner_token, record.live) == (
        expected.fingerprint,
        expected.state,
        expected.owner_token,
        expected.live,
    )
    # The time left until the key expires, on the database clock (negative once passed).
    assert record.expires_in == pytest.approx(expected.expires_in, abs=0.5)
    assert record.expires_in == pytest.approx(expires_in.total_seconds(), abs=1)
    if lease is None or completed:
        assert record.lease_remaining is expected.lease_remaining is None
    else:  # read a moment apart, on the database clock
        assert record.lease_remaining == pytest.approx(expected.lease_remaining, abs=0.5)


def test_heartbeat_scheduler_drops_heartbeats_that_stopped_before_they_started():
    from types import SimpleNamespace

    from django_idempotency.core import _Scheduler

    scheduler = _Scheduler()
    far = time.monotonic() + 3600
    finished = [SimpleNamespace(stopped=True) for _ in range(1001)]
    running = SimpleNamespace(stopped=False)
    scheduler.add(far, running)
    for heartbeat in finished:
        scheduler.add(far, heartbeat)

    for _ in finished:
        scheduler.forget()

    assert [entry[2] for entry in scheduler._queue] == [running]


@pytest.fixture
def unreachable_server_store():
    """A store on this database's vendor, at a port where no server listens."""
    if connection.vendor not in ("postgresql", "mysql"):
        pytest.skip("the plain-SQL statements are PostgreSQL's and MySQL's")
    settings_dict = {**connection.settings_dict, "HOST": "127.0.0.1", "PORT": "9"}
    settings_dict["OPTIONS"] = {**settings_dict.get("OPTIONS", {}), "connect_timeout": 2}
    alias = "unreachable-server"
    wrapper = type(connections["default"])(settings_dict, alias)
    connections[alias] = wrapper
    store = DatabaseStore()
    store.using = alias
    yield store
    wrapper.close()
    del connections[alias]


def test_unreachable_server_is_a_store_failure_from_every_statement(unreachable_server_store):
    store = unreachable_server_store
    claim = ClaimRequest(
        scope="user:1",
        key="k-1",
        fingerprint="f" * 64,
        method="POST",
        path="/charges/",
        token="t" * 32,
        ttl=timedelta(hours=1),
    )

    with pytest.raises(StoreUnavailable):
        store.get(scope="user:1", key="k-1")
    with pytest.raises(StoreUnavailable):
        store.complete(claim, StoredResponse(status=201, headers=[], body=b"{}"))
    with pytest.raises(StoreUnavailable), store.lock(claim):
        pass


def test_a_key_that_vanishes_before_it_is_locked_is_retried_at_once():
    claim = ClaimRequest(
        scope="user:1",
        key="gone",
        fingerprint="f" * 64,
        method="POST",
        path="/charges/",
        token="t" * 32,
        ttl=timedelta(hours=1),
    )

    # insert=False: the store goes straight to locking a row that is not there (a release or
    # a purge deleted it after the insert found it).
    with pytest.raises(KeyVanished) as caught:
        DatabaseStore().claim(claim, lease=timedelta(seconds=30), insert=False)

    assert isinstance(caught.value, KeyLocked)
    assert caught.value.retry_after == 0


def test_an_unknown_statement_strategy_is_refused():
    store = DatabaseStore()
    store.statements = "raw"

    with pytest.raises(ImproperlyConfigured, match="'auto' or 'orm'"):
        store.get(scope="user:1", key="k-1")


def test_with_the_replay_cache_every_statement_still_reaches_the_database(settings):
    # The replay cache sits in front of the store's statements (ReplayCached): the writes that
    # it does not accelerate must pass through to the database unchanged.
    settings.IDEMPOTENCY_REPLAY_CACHE = "default"
    store = DatabaseStore()
    claim = ClaimRequest(
        scope="user:1",
        key="k-1",
        fingerprint="f" * 64,
        method="POST",
        path="/charges/",
        token="t" * 32,
        ttl=timedelta(hours=1),
    )
    lease = timedelta(seconds=30)

    assert store.claim(claim, lease=lease).owner_token == claim.token
    assert store.renew(claim, lease=lease)
    assert store.save_recovery_points(claim, (("order", 7),))
    assert store.end_lease(claim)  # a retry of the same request may now resume it
    retry = ClaimRequest(**{**vars(claim), "token": "r" * 32})
    resumed = store.claim(retry, lease=lease, insert=False)
    assert (resumed.owner_token, resumed.recovery_points) == (retry.token, (("order", 7),))
    with store.lock(retry, insert=False) as record:  # ours already: nothing to take over
        assert record.owner_token == retry.token
    assert store.release(retry)
    assert IdempotencyKey.objects.count() == 0
