"""Idempotent functions and blocks (``django_idempotency.functions``), on both stores.

The same contract as the views': one run per key, the stored result to every later call, the
key reused with other arguments refused, a running call's duplicates held off, failures
leaving the key free, TTL and purge. Effects are ``Charge`` rows, counted by each test.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, transaction

from django_idempotency import signals
from django_idempotency.exceptions import (
    IdempotencyKeyInProgress,
    IdempotencyKeyMismatch,
    IdempotencyKeyMissing,
    IdempotencyResponseNotStored,
    StoreUnavailable,
)
from django_idempotency.functions import (
    JSONSerializer,
    idempotent_call,
    idempotent_function,
)
from django_idempotency.models import IdempotencyKey
from tests.models import Charge
from tests.store_harness import COMPLETED, cache_only, database_only

pytestmark = pytest.mark.django_db(transaction=True)

SCOPE = "function:tests.test_functions.charge"


@idempotent_function
def charge(amount, note=""):
    row = Charge.objects.create(amount=amount, note=note)
    return {"charge": row.pk, "amount": amount}


@idempotent_function(key=lambda order_id, amount: f"refund-{order_id}", atomic=False)
def refund(order_id, amount):
    row = Charge.objects.create(amount=-amount, note=f"refund {order_id}")
    return {"refund": row.pk}


async def close_connections():
    """Close the connections of sync_to_async's thread, which outlives ``asyncio.run()``."""
    await sync_to_async(connections.close_all)()


def lease(function):
    """``function`` in the lease mode, which every store has."""
    return idempotent_function(atomic=False)(function)


def test_a_function_runs_once_per_key_and_later_calls_get_its_result(store):
    call = lease(charge.__wrapped__)

    first = call(5, idempotency_key="order-1")
    second = call(5, idempotency_key="order-1")
    third = call(5, idempotency_key="order-1")

    assert Charge.objects.count() == 1
    assert first == second == third == {"charge": Charge.objects.get().pk, "amount": 5}
    other = call(5, idempotency_key="order-2")
    assert other["charge"] != first["charge"]
    assert Charge.objects.count() == 2
    record = store.get("order-1", scope="function:tests.test_functions.charge")
    assert record is not None
    assert record.state == COMPLETED
    assert record.method == "CALL"
    assert record.path == "tests.test_functions.charge"
    assert record.headers == [("Content-Type", "application/json")]


def test_the_default_mode_is_atomic_on_the_database_store():
    charge(5, idempotency_key="k")
    charge(5, idempotency_key="k")

    assert Charge.objects.count() == 1
    row = IdempotencyKey.objects.get(key="k")
    assert row.scope == SCOPE
    assert row.lease_until is None  # claimed without a lease: the atomic mode


def test_the_key_can_come_from_the_arguments(store):
    first = refund(41, 300)
    again = refund(41, 300)

    assert first == again
    assert Charge.objects.filter(note="refund 41").count() == 1
    assert store.get("refund-41", scope="function:tests.test_functions.refund") is not None


def test_a_callers_key_takes_precedence_over_the_key_function(store):
    refund(41, 300, idempotency_key="manual")
    refund(41, 300)

    assert Charge.objects.count() == 2


def test_a_call_without_a_key_is_refused_with_a_clear_error():
    with pytest.raises(IdempotencyKeyMissing, match=r"needs a key: pass idempotency_key="):
        charge(5)
    with pytest.raises(IdempotencyKeyMissing, match="needs a key"):
        charge(5, idempotency_key="")
    with pytest.raises(IdempotencyKeyMissing, match="must not be empty"):
        idempotent_call("", scope="s")
    assert Charge.objects.count() == 0


def test_a_call_without_a_key_runs_unprotected_when_keys_are_optional():
    optional = idempotent_function(required=False)(charge.__wrapped__)

    optional(5)
    optional(5)

    assert Charge.objects.count() == 2
    assert IdempotencyKey.objects.count() == 0


@pytest.mark.parametrize("bad", [b"bytes", None])
def test_a_key_must_be_text(bad):
    with pytest.raises(TypeError, match="must be a string"):
        idempotent_call(bad, scope="s")


def test_a_long_key_or_scope_is_stored_as_its_digest(store):
    key = "k" * 1000
    first = lease(charge.__wrapped__)(5, idempotency_key=key)
    again = lease(charge.__wrapped__)(5, idempotency_key=key)

    assert first == again
    assert Charge.objects.count() == 1
    with idempotent_call(key, scope="s" * 300, atomic=False) as call:
        assert len(call.key) == 64
        assert len(call.scope) == 64


def test_the_key_reused_with_other_arguments_raises_a_mismatch(store):
    call = lease(charge.__wrapped__)
    call(5, idempotency_key="k")

    with pytest.raises(IdempotencyKeyMismatch, match="different arguments") as raised:
        call(6, idempotency_key="k")

    assert raised.value.status_code == 422
    assert "tests.test_functions.charge" in str(raised.value)
    assert Charge.objects.count() == 1


def test_keyword_order_does_not_change_the_fingerprint(store):
    call = lease(charge.__wrapped__)
    call(amount=5, note="a", idempotency_key="k")
    call(note="a", amount=5, idempotency_key="k")

    assert Charge.objects.count() == 1


def test_a_custom_fingerprint_decides_what_counts_as_the_same_call(store):
    # Only the amount matters: a different note is the same call.
    call = idempotent_function(atomic=False, fingerprint=lambda amount, note="": amount)(
        charge.__wrapped__
    )
    call(5, note="a", idempotency_key="k")
    call(5, note="b", idempotency_key="k")
    with pytest.raises(IdempotencyKeyMismatch):
        call(6, note="a", idempotency_key="k")
    assert Charge.objects.count() == 1


def test_model_instances_are_fingerprinted_by_their_primary_key(store):
    first, second = Charge.objects.create(amount=1), Charge.objects.create(amount=2)

    @idempotent_function(atomic=False)
    def note(row):
        Charge.objects.filter(pk=row.pk).update(note="noted")
        return row.pk

    assert note(first, idempotency_key="k") == first.pk
    assert note(Charge.objects.get(pk=first.pk), idempotency_key="k") == first.pk
    with pytest.raises(IdempotencyKeyMismatch):
        note(second, idempotency_key="k")


def test_arguments_that_cannot_be_fingerprinted_say_what_to_do():
    with pytest.raises(TypeError, match=r"Pass fingerprint="):
        charge(object(), idempotency_key="k")
    assert Charge.objects.count() == 0


def test_each_function_has_its_own_scope(store):
    @idempotent_function(atomic=False)
    def other(amount, note=""):
        return Charge.objects.create(amount=amount).pk

    lease(charge.__wrapped__)(5, idempotency_key="shared")
    other(5, idempotency_key="shared")

    assert Charge.objects.count() == 2


def test_a_scope_can_be_named_or_computed(store):
    per_tenant = idempotent_function(atomic=False, scope=lambda tenant, amount: f"tenant:{tenant}")

    @per_tenant
    def pay(tenant, amount):
        return Charge.objects.create(amount=amount, note=tenant).pk

    pay("a", 5, idempotency_key="k")
    pay("a", 5, idempotency_key="k")
    pay("b", 5, idempotency_key="k")

    assert sorted(Charge.objects.values_list("note", flat=True)) == ["a", "b"]
    assert store.get("k", scope="tenant:a") is not None


def test_a_call_that_raises_stores_nothing_and_a_retry_runs_again(store):
    attempts = []

    @idempotent_function(atomic=False)
    def flaky(amount):
        attempts.append(amount)
        Charge.objects.create(amount=amount)
        if len(attempts) == 1:
            raise ConnectionError("the provider timed out")
        return "done"

    with pytest.raises(ConnectionError):
        flaky(5, idempotency_key="k")
    assert store.get("k", scope="function:" + flaky.idempotent_function) is None

    assert flaky(5, idempotency_key="k") == "done"
    assert flaky(5, idempotency_key="k") == "done"
    assert len(attempts) == 2


def test_the_atomic_mode_rolls_back_a_failed_calls_writes():
    @idempotent_function
    def failing(amount):
        Charge.objects.create(amount=amount)
        raise ValueError("declined")

    with pytest.raises(ValueError, match="declined"):
        failing(5, idempotency_key="k")

    assert Charge.objects.count() == 0
    assert IdempotencyKey.objects.count() == 0


def test_the_atomic_mode_commits_with_the_callers_transaction():
    def callers_work():
        with transaction.atomic():
            charge(5, idempotency_key="k")
            assert IdempotencyKey.objects.filter(key="k").exists()
            raise RuntimeError("the caller's transaction fails later")

    with pytest.raises(RuntimeError):
        callers_work()

    # Rolled back with the caller's transaction: the call never happened, and runs again.
    assert Charge.objects.count() == 0
    assert IdempotencyKey.objects.count() == 0
    charge(5, idempotency_key="k")
    assert Charge.objects.count() == 1


def test_a_result_the_serializer_cannot_store_undoes_an_atomic_call():
    @idempotent_function
    def returns_a_model(amount):
        return Charge.objects.create(amount=amount)

    with pytest.raises(TypeError, match="not JSON serializable"):
        returns_a_model(5, idempotency_key="k")

    assert Charge.objects.count() == 0
    assert IdempotencyKey.objects.count() == 0


def test_results_come_back_as_the_serializer_gives_them(store):
    @idempotent_function(atomic=False)
    def priced(amount):
        Charge.objects.create(amount=amount)
        return {"price": Decimal("9.90"), "tags": ("a", "b")}

    # The first call gets what every replay gets: the result as JSON gives it back.
    assert priced(5, idempotency_key="k") == {"price": "9.90", "tags": ["a", "b"]}
    assert priced(5, idempotency_key="k") == {"price": "9.90", "tags": ["a", "b"]}


class ReprSerializer:
    """A serializer of the project's own: Python literals."""

    content_type = "text/x-python-literal"

    def dumps(self, value):
        return repr(value).encode()

    def loads(self, data):
        import ast

        return ast.literal_eval(data.decode())


def test_the_serializer_is_pluggable_per_function_and_by_setting(store, settings):
    @idempotent_function(atomic=False, serializer=ReprSerializer())
    def pair(amount):
        Charge.objects.create(amount=amount)
        return (amount, {amount})

    assert pair(5, idempotency_key="k") == pair(5, idempotency_key="k") == (5, {5})
    assert store.get("k", scope="function:" + pair.idempotent_function).headers == [
        ("Content-Type", "text/x-python-literal")
    ]

    settings.IDEMPOTENCY_SERIALIZER = "tests.test_functions.ReprSerializer"
    with idempotent_call("k2", scope="block", atomic=False) as call:
        call.save((1, 2))
    with idempotent_call("k2", scope="block", atomic=False) as call:
        assert call.replayed
        assert call.result == (1, 2)


def test_a_result_too_large_to_store_is_not_run_again(store, settings):
    settings.IDEMPOTENCY_MAX_RESPONSE_SIZE = 100

    @idempotent_function(atomic=False)
    def big(amount):
        Charge.objects.create(amount=amount)
        return "x" * 500

    assert big(5, idempotency_key="k") == "x" * 500
    with pytest.raises(IdempotencyResponseNotStored, match="will not run again"):
        big(5, idempotency_key="k")
    assert Charge.objects.count() == 1


def test_a_key_held_by_a_running_call_raises_in_progress(store):
    call = idempotent_call("k", scope="block", fingerprint=[1], atomic=False)
    fingerprint = call.fingerprint
    store.plant("k", scope="block", fingerprint=fingerprint, method="CALL", path="block")

    with pytest.raises(IdempotencyKeyInProgress, match="still running") as raised, call:
        pytest.fail("the block must not run")

    assert raised.value.status_code == 409
    assert raised.value.headers == {"Retry-After": "1"}


def test_a_duplicate_waits_for_the_running_call_and_gets_its_result(store):
    started, go_on = threading.Event(), threading.Event()
    results = []

    @idempotent_function(atomic=False, wait=timedelta(seconds=10))
    def slow(amount):
        started.set()
        go_on.wait(10)
        Charge.objects.create(amount=amount)
        return "first"

    def first():
        try:
            results.append(slow(5, idempotency_key="k"))
        finally:
            connection.close()

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(10)
    threading.Timer(0.3, go_on.set).start()
    results.append(slow(5, idempotency_key="k"))
    thread.join(10)

    assert results == ["first", "first"]
    assert Charge.objects.count() == 1


@pytest.mark.skipif(
    not connection.features.has_select_for_update,
    reason="threads racing on one key need row locks: PostgreSQL or MariaDB",
)
@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "lease"])
def test_concurrent_calls_with_one_key_run_once(atomic):
    barrier = threading.Barrier(8)
    outcomes = []

    @idempotent_function(atomic=atomic, wait=timedelta(seconds=20))
    def pay(amount):
        row = Charge.objects.create(amount=amount)
        return row.pk

    def worker():
        barrier.wait()
        try:
            outcomes.append(pay(5, idempotency_key="race"))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert Charge.objects.count() == 1
    assert outcomes == [Charge.objects.get().pk] * 8


def test_an_expired_key_runs_again_and_is_purged_like_a_requests(store):
    call = lease(charge.__wrapped__)
    call(5, idempotency_key="k")
    store.expire("k", scope=SCOPE)

    call(5, idempotency_key="k")
    assert Charge.objects.count() == 2


@database_only  # purge() is the database store's; Redis expires keys by itself
def test_a_functions_ttl_is_kept_and_purge_deletes_its_expired_keys(store):
    @idempotent_function(ttl=timedelta(minutes=5))
    def short(amount):
        return Charge.objects.create(amount=amount).pk

    short(5, idempotency_key="k")
    row = IdempotencyKey.objects.get(key="k")
    # Both set by the database's clock, a few milliseconds apart.
    assert timedelta(minutes=4) < row.expires_at - row.created_at < timedelta(minutes=5, seconds=1)

    store.expire("k", scope="function:" + short.idempotent_function)
    assert IdempotencyKey.objects.purge() == 1
    assert IdempotencyKey.objects.count() == 0


def test_a_block_runs_once_and_replays_its_saved_result(store):
    runs = []
    for _ in range(3):
        with idempotent_call("invoice-7", scope="billing.send", atomic=False) as call:
            if call.replayed:
                result = call.result
            else:
                runs.append(1)
                result = call.save({"message": "m-1"})
        assert result == {"message": "m-1"}

    assert runs == [1]
    assert store.get("invoice-7", scope="billing.send").state == COMPLETED


def test_a_block_that_ends_without_saving_stores_none(store):
    with idempotent_call("k", scope="s", atomic=False) as call:
        assert call.claimed
    with idempotent_call("k", scope="s", atomic=False) as call:
        assert call.replayed
        assert call.result is None


def test_a_block_that_raises_frees_its_key(store):
    with pytest.raises(KeyError), idempotent_call("k", scope="s", atomic=False):
        raise KeyError("boom")

    assert store.get("k", scope="s") is None


def test_a_block_refuses_to_save_twice_or_after_a_replay(store):
    with idempotent_call("k", scope="s", atomic=False) as call:
        call.save(1)
        with pytest.raises(RuntimeError, match="saved already"):
            call.save(2)
    with (
        idempotent_call("k", scope="s", atomic=False) as call,
        pytest.raises(RuntimeError, match="nothing to save"),
    ):
        call.save(3)


def test_a_blocks_scope_is_required_text():
    with pytest.raises(TypeError, match="scope of an idempotent call must be a non-empty string"):
        idempotent_call("k", scope="")


@cache_only
def test_the_cache_store_has_no_atomic_mode_for_calls(store):
    with pytest.raises(ImproperlyConfigured, match="no atomic mode"):
        idempotent_function(atomic=True)(charge.__wrapped__)(5, idempotency_key="k")
    assert Charge.objects.count() == 0


def test_async_functions_run_once_in_the_lease_mode(store):
    @idempotent_function
    async def fetch(amount):
        await asyncio.sleep(0)
        row = await Charge.objects.acreate(amount=amount)
        return row.pk

    async def main():
        try:
            return [await fetch(5, idempotency_key="k") for _ in range(3)]
        finally:
            await close_connections()

    results = asyncio.run(main())
    assert results == [Charge.objects.get().pk] * 3
    view = store.get("k", scope="function:" + fetch.idempotent_function)
    assert view.state == COMPLETED


def test_an_async_function_that_raises_frees_its_key(store):
    @idempotent_function
    async def failing(amount):
        raise ValueError("no")

    async def main():
        try:
            await failing(5, idempotency_key="k")
        finally:
            await close_connections()

    with pytest.raises(ValueError, match="no"):
        asyncio.run(main())
    assert store.get("k", scope="function:" + failing.idempotent_function) is None


def test_an_async_function_refuses_the_atomic_mode():
    async def view(amount):
        return amount

    with pytest.raises(ImproperlyConfigured, match="cannot hold a transaction open"):
        idempotent_function(atomic=True)(view)


def test_a_call_sends_the_same_signals_as_a_request(store):
    events = []

    def receiver(signal, **kwargs):
        events.append((kwargs["key"], kwargs["request"], signal))

    for signal in (signals.key_claimed, signals.response_stored, signals.response_replayed):
        signal.connect(receiver)
    try:
        lease(charge.__wrapped__)(5, idempotency_key="k")
        lease(charge.__wrapped__)(5, idempotency_key="k")
    finally:
        for signal in (signals.key_claimed, signals.response_stored, signals.response_replayed):
            signal.disconnect(receiver)

    assert events == [
        ("k", None, signals.key_claimed),
        ("k", None, signals.response_stored),
        ("k", None, signals.response_replayed),
    ]


def test_an_unreachable_store_raises_unless_failing_open(offline_store, settings, caplog):
    @idempotent_function(atomic=False)
    def pay(amount):
        return Charge.objects.create(amount=amount).pk

    with pytest.raises(StoreUnavailable):
        pay(5, idempotency_key="k")
    assert Charge.objects.count() == 0

    settings.IDEMPOTENCY_FAIL_OPEN = True
    with caplog.at_level(logging.WARNING, logger="django_idempotency"):
        pay(5, idempotency_key="k")
    assert Charge.objects.count() == 1
    assert "running the call for key 'k' unprotected" in caplog.text


def test_the_json_serializer_round_trips_what_json_can_hold():
    serializer = JSONSerializer()
    assert serializer.loads(serializer.dumps({"a": [1, None, "x"]})) == {"a": [1, None, "x"]}


def test_a_result_the_serializer_cannot_store_is_not_run_again_in_the_lease_mode(store):
    runs = []

    @idempotent_function(atomic=False)
    def returns_a_model(amount):
        runs.append(amount)
        return Charge.objects.create(amount=amount)

    with pytest.raises(TypeError, match=r"returns_a_model returned a result that JSONSerializer"):
        returns_a_model(5, idempotency_key="k")

    # Its effect stays (the lease mode cannot undo it), and no retry repeats it.
    with pytest.raises(IdempotencyResponseNotStored):
        returns_a_model(5, idempotency_key="k")
    assert runs == [5]
    assert Charge.objects.count() == 1


def test_a_replayed_call_refuses_to_run_a_phase(store):
    with idempotent_call("k", scope="s", atomic=False) as call:
        call.save(1)
    ran = []
    with (
        idempotent_call("k", scope="s", atomic=False) as call,
        pytest.raises(RuntimeError, match="replayed: its phase 'p' must not run"),
    ):
        call.phase("p", lambda: ran.append(1))
    assert ran == []


# -- Options are validated where they are given -----------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl": 3600}, "ttl must be a positive timedelta, not 3600 (int)"),
        ({"wait": 2}, "wait must be a datetime.timedelta of zero or more, not 2 (int)"),
        ({"atomic": "yes"}, "atomic must be True or False, not 'yes' (str)"),
        ({"required": None}, "required must be True or False, not None"),
        ({"key": "order-1"}, "key must be a function of the arguments, not 'order-1' (str)"),
        ({"fingerprint": 3}, "fingerprint must be a function of the arguments, not 3 (int)"),
        ({"scope": ""}, "scope must be a non-empty string or a function of the arguments"),
        ({"scope": 7}, "scope must be a non-empty string or a function of the arguments"),
        ({"serializer": object()}, "serializer must be a serializer (with dumps() and loads())"),
    ],
)
def test_a_wrong_option_is_refused_when_the_function_is_decorated(options, message):
    def refund(order_id): ...

    with pytest.raises(ImproperlyConfigured) as caught:
        idempotent_function(**options)(refund)

    assert str(caught.value).startswith(f"@idempotent_function on {__name__}.")
    assert message in str(caught.value)


def test_a_positional_option_of_idempotent_function_is_a_type_error():
    with pytest.raises(TypeError, match="by keyword"):
        idempotent_function("refund")


def test_a_wrong_option_of_idempotent_call_is_refused_before_anything_is_claimed():
    with (
        pytest.raises(ImproperlyConfigured, match=r"'billing': wait must be a datetime"),
        idempotent_call("invoice-1", scope="billing", wait=2),
    ):
        raise AssertionError("the block must not run")
    assert not IdempotencyKey.objects.exists()
