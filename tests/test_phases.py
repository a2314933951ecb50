"""Atomic phases and recovery points (``Run.phase``, ``Run.foreign_key``), in one process.

The view under test (``tests/reliability_views.py``, ``/phased/``) checks out in three
phases: an order (atomic), a charge at a payment provider that deduplicates by idempotency
key (``atomic=False``, keyed by ``foreign_key("payment")``), and a receipt (atomic).
an ``X-Fail`` header makes it raise at a given point, as a crash would stop it there; the tests with
real ``SIGKILL``ed gunicorn workers are in ``tests/test_reliability_crashes.py``.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db.models.functions import Now
from django.test import Client

from django_idempotency.exceptions import IdempotencyLeaseLost
from django_idempotency.functions import idempotent_call
from django_idempotency.models import IdempotencyKey
from tests.models import Charge
from tests.reliability_views import provider_ledger
from tests.store_harness import cache_only

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls("tests.reliability_views")]


@pytest.fixture(autouse=True)
def hold_dir(tmp_path, monkeypatch):
    """The views' hold files live here; no test here holds a view."""
    monkeypatch.setenv("RELIABILITY_HOLD_DIR", str(tmp_path))


@pytest.fixture
def client():
    return Client(raise_request_exception=False)


def post(client, key, *, note="n", fail="", url="/phased/"):
    headers = {"X-Fail": fail}
    if key is not None:
        headers["Idempotency-Key"] = key
    target = f"{url}?note={note}"
    return client.post(target, {"amount": 7}, content_type="application/json", headers=headers)


def effects(note="n"):
    """How often each phase's effect exists, and how often the provider was called."""
    ledger = provider_ledger()
    return {
        "orders": Charge.objects.filter(note=f"{note}:order").count(),
        "receipts": Charge.objects.filter(note=f"{note}:receipt").count(),
        "provider_charges": len({calls[0] for calls in ledger.values()}),
        "provider_calls": sum(len(calls) for calls in ledger.values()),
    }


ONCE = {"orders": 1, "receipts": 1, "provider_charges": 1, "provider_calls": 1}


def test_a_phased_view_runs_each_phase_once_and_stores_its_points(client):
    first = post(client, "k")
    replay = post(client, "k")

    assert first.status_code == 201
    assert replay.content == first.content
    assert replay["Idempotent-Replayed"] == "true"
    assert effects() == ONCE
    body = first.json()
    assert body["resumed_after"] is None
    row = IdempotencyKey.objects.get(key="k")
    assert row.state == IdempotencyKey.State.COMPLETED
    assert row.recovery_points == [
        ["order", body["order"]],
        ["payment", body["payment"]],
        ["receipt", body["receipt"]],
    ]
    assert row.recovery_point == "receipt"


def test_a_retry_after_a_failure_resumes_after_the_last_committed_phase(client):
    failed = post(client, "k", fail="after-order")

    assert failed.status_code == 500
    row = IdempotencyKey.objects.annotate(db_now=Now()).get(key="k")
    assert row.state == IdempotencyKey.State.IN_PROGRESS
    assert row.recovery_point == "order"
    # The failed attempt ended its own lease: the retry need not wait for it.
    assert row.lease_until <= row.db_now
    assert effects()["orders"] == 1

    retry = post(client, "k")

    assert retry.status_code == 201
    assert retry.json()["resumed_after"] == "order"
    assert retry.json()["order"] == row.recovery_points[0][1]
    assert effects() == ONCE


def test_a_crash_after_a_foreign_call_repeats_it_with_the_same_key(client):
    assert post(client, "k", fail="after-provider-call").status_code == 500
    assert IdempotencyKey.objects.get(key="k").recovery_point == "order"

    retry = post(client, "k")

    assert retry.status_code == 201
    assert retry.json()["resumed_after"] == "order"
    # The provider was called twice, with one key, and charged once.
    assert effects() == {**ONCE, "provider_calls": 2}
    assert list(provider_ledger()) == [retry.json()["payment_key"]]


def test_an_atomic_phase_that_fails_leaves_nothing_behind(client):
    assert post(client, "k", fail="in-receipt").status_code == 500

    assert effects() == {**ONCE, "receipts": 0}
    assert IdempotencyKey.objects.get(key="k").recovery_point == "payment"

    retry = post(client, "k")
    assert retry.json()["resumed_after"] == "payment"
    assert effects() == ONCE


def test_foreign_keys_are_stable_per_key_and_differ_per_key_and_name(client):
    post(client, "k", fail="after-order")
    resumed = post(client, "k").json()
    other = post(client, "other", note="o").json()

    ledger = provider_ledger()
    assert ledger[resumed["payment_key"]][0] == resumed["payment"]["provider_charge"]
    assert other["payment_key"] != resumed["payment_key"]
    assert len(resumed["payment_key"]) == 64


def test_a_different_request_with_an_abandoned_key_is_refused(client):
    post(client, "k", fail="after-order")

    other = client.post(
        "/phased/?note=n",
        {"amount": 8},
        content_type="application/json",
        headers={"Idempotency-Key": "k"},
    )

    assert other.status_code == 422
    assert IdempotencyKey.objects.get(key="k").recovery_point == "order"


def test_phases_run_unprotected_without_a_key(client):
    first = post(client, None, url="/phased/optional/")
    second = post(client, None, url="/phased/optional/")

    assert first.status_code == second.status_code == 201
    assert first.json()["payment_key"] != second.json()["payment_key"]
    assert effects()["orders"] == 2
    assert IdempotencyKey.objects.count() == 0


def test_in_the_atomic_mode_a_failure_undoes_every_phase_but_the_foreign_call(client):
    assert post(client, "k", url="/phased/atomic/", fail="in-receipt").status_code == 500

    # The order and the points rolled back with the view's transaction; the provider's charge
    # is another service's, and stays.
    assert effects() == {"orders": 0, "receipts": 0, "provider_charges": 1, "provider_calls": 1}
    assert IdempotencyKey.objects.count() == 0

    retry = post(client, "k", url="/phased/atomic/")
    assert retry.status_code == 201
    assert retry.json()["resumed_after"] is None
    # The retry made its foreign call again, with the same derived key: still one charge.
    assert effects() == {**ONCE, "provider_calls": 2}


@cache_only  # the database store keeps recovery points; the cache store cannot
def test_the_cache_store_refuses_phases(store):
    client = Client()
    with pytest.raises(ImproperlyConfigured, match="phases need the DatabaseStore"):
        post(client, "k")
    assert effects()["orders"] == 0


def test_a_phase_name_runs_once_per_request():
    with idempotent_call("k", scope="s", atomic=False) as call:
        call.phase("one", lambda: 1)
        with pytest.raises(ValueError, match="already run"):
            call.phase("one", lambda: 2)


def test_a_phase_result_must_be_json():
    with (
        idempotent_call("k", scope="s", atomic=False) as call,
        pytest.raises(TypeError, match="JSON"),
    ):
        call.phase("one", object)


def test_a_block_resumes_after_its_last_committed_phase():
    runs = []

    def attempt(fail: bool):
        with idempotent_call("job-1", scope="jobs", atomic=False) as call:
            if call.replayed:
                return call.result
            first = call.phase("download", lambda: runs.append("download") or "file-1")
            if fail:
                raise ConnectionError("lost the worker")
            second = call.phase("import", lambda: runs.append("import") or 42)
            return call.save([first, second, call.resumed_after])

    with pytest.raises(ConnectionError):
        attempt(fail=True)
    assert attempt(fail=False) == ["file-1", 42, "download"]
    assert attempt(fail=False) == ["file-1", 42, "download"]
    assert runs == ["download", "import"]


def test_a_phase_whose_key_was_taken_over_stops_the_work():
    thief = uuid.uuid4().hex
    with (  # noqa: PT012
        pytest.raises(IdempotencyLeaseLost, match="taken over"),
        idempotent_call("k", scope="s", atomic=False) as call,
    ):
        call.phase("one", lambda: 1)
        # Another attempt took the key over (our lease passed while we were stuck).
        IdempotencyKey.objects.filter(key="k").update(owner_token=thief)
        call.phase("two", lambda: 2)

    row = IdempotencyKey.objects.get(key="k")
    assert row.owner_token == thief
    assert row.recovery_point == "one"


def test_an_abandoned_key_past_its_ttl_starts_afresh_without_points(client):
    post(client, "k", fail="after-order")
    IdempotencyKey.objects.filter(key="k").update(expires_at=Now() - timedelta(seconds=1))

    fresh = post(client, "k")

    assert fresh.status_code == 201
    assert fresh.json()["resumed_after"] is None
    assert effects()["orders"] == 2
    assert IdempotencyKey.objects.get(key="k").recovery_point == "receipt"


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "lease"])
def test_a_phase_after_the_result_is_saved_is_refused(atomic):
    with idempotent_call("k", scope="s", atomic=atomic) as call:
        call.save(1)
        with pytest.raises(RuntimeError, match="after its request or call has finished"):
            call.phase("late", lambda: Charge.objects.create(amount=1))
    assert Charge.objects.count() == 0


def test_an_atomic_phase_whose_key_was_taken_over_rolls_back_its_writes():
    def take_over():
        Charge.objects.create(amount=1, note="phase")
        IdempotencyKey.objects.filter(key="k").update(owner_token=uuid.uuid4().hex)
        return 1

    with (
        pytest.raises(IdempotencyLeaseLost),
        idempotent_call("k", scope="s", atomic=False) as call,
    ):
        call.phase("one", take_over)

    assert not Charge.objects.filter(note="phase").exists()


def test_a_failed_attempts_ended_lease_cannot_be_renewed_by_its_late_heartbeat(client):
    from django_idempotency.stores import ClaimRequest, DatabaseStore

    post(client, "k", fail="after-order")
    row = IdempotencyKey.objects.get(key="k")
    # What the failed attempt's heartbeat would send, had it been in flight: its claim.
    old = ClaimRequest(
        scope=row.scope,
        key=row.key,
        fingerprint=row.fingerprint,
        method="POST",
        path="/phased/",
        token="0" * 32,
        ttl=timedelta(hours=1),
    )
    IdempotencyKey.objects.filter(pk=row.pk).update(owner_token=old.token)
    store = DatabaseStore()
    assert store.end_lease(old)

    assert not store.renew(old, lease=timedelta(seconds=30))
    ended = IdempotencyKey.objects.annotate(db_now=Now()).get(pk=row.pk)
    assert ended.lease_until <= ended.db_now
    assert ended.owner_token != old.token
    assert post(client, "k").json()["resumed_after"] == "order"


def test_an_async_view_runs_phases_with_aphase(client):
    first = post(client, "k", url="/phased/async/", fail="after-order")
    assert first.status_code == 500
    retry = post(client, "k", url="/phased/async/")

    assert retry.status_code == 201
    assert retry.json()["resumed_after"] == "order"
    assert effects() == ONCE


def test_a_sync_phase_called_from_async_code_says_to_await_aphase():
    import asyncio

    from django_idempotency.core import Run

    async def main():
        with pytest.raises(RuntimeError, match=r"use await run.aphase"):
            Run().phase("p", lambda: 1)

    asyncio.run(main())


def test_a_drf_view_finds_its_run_on_the_request(client):
    pytest.importorskip("rest_framework")
    first = post(client, "k", url="/phased/drf/", fail="after-order")
    assert first.status_code == 500
    retry = post(client, "k", url="/phased/drf/")

    assert retry.status_code == 201
    assert retry.json()["resumed_after"] == "order"
    assert effects() == ONCE
