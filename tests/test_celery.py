"""Idempotent Celery tasks (``django_idempotency.celery``): at-least-once delivery, one effect.

The first part runs tasks in this process with ``apply()`` (Celery's eager mode). The second
starts a real worker (prefork, two processes, ``acks_late``) with Redis as broker and result
backend (``tests/celery_support.py``), sends it the same message three times, one after
another and all at once, and counts the effects in the database the worker writes to: the
test database on PostgreSQL and MariaDB, an SQLite file of the test's own on SQLite.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator

import pytest

pytest.importorskip("celery", reason="celery is not installed (pip install 'celery[redis]')")

from celery._state import pop_current_task, push_current_task
from celery.exceptions import Retry
from django.db import connection

from django_idempotency.celery import idempotent_task
from django_idempotency.exceptions import (
    IdempotencyKeyInProgress,
    IdempotencyKeyMismatch,
    IdempotencyKeyMissing,
)
from django_idempotency.functions import IdempotentCall
from django_idempotency.models import DeadLetter, IdempotencyKey
from tests import celery_tasks
from tests.celery_support import Worker
from tests.factories import IdempotencyKeyFactory
from tests.models import Charge

CHARGE_SCOPE = "celery:tests.celery_tasks.charge"


def new_message() -> str:
    return uuid.uuid4().hex


# -- Eager mode: apply() in this process ----------------------------------------------------


@pytest.mark.django_db
def test_task_applied_three_times_with_one_task_id_has_one_effect():
    message, task_id = new_message(), str(uuid.uuid4())

    results = [celery_tasks.charge.apply((message, 7), task_id=task_id).get() for _ in range(3)]

    assert Charge.objects.filter(note=message).count() == 1
    charge = Charge.objects.get(note=message)
    assert results == [{"charge": charge.pk, "message": message, "amount": 7}] * 3
    row = IdempotencyKey.objects.get(scope=CHARGE_SCOPE, key=task_id)
    assert row.state == IdempotencyKey.State.COMPLETED


@pytest.mark.django_db(transaction=True)
def test_a_delivery_after_a_failure_resumes_after_the_tasks_last_phase():
    message, task_id = new_message(), str(uuid.uuid4())

    with pytest.raises(ConnectionError, match="after downloading"):
        celery_tasks.import_file.apply((message,), task_id=task_id).get()
    result = celery_tasks.import_file.apply((message,), task_id=task_id).get()
    again = celery_tasks.import_file.apply((message,), task_id=task_id).get()

    assert result["resumed_after"] == "download"
    assert again == result
    assert Charge.objects.filter(note=f"{message}:download").count() == 1
    assert Charge.objects.filter(note=f"{message}:import").count() == 1


@pytest.mark.django_db
def test_task_applied_with_new_task_ids_runs_each_time():
    message = new_message()

    for _ in range(2):
        celery_tasks.charge.apply((message, 7)).get()

    assert Charge.objects.filter(note=message).count() == 2


@pytest.mark.django_db
def test_messages_with_one_message_id_and_new_task_ids_have_one_effect():
    message = new_message()
    event = {"id": message, "amount": 3}

    results = [celery_tasks.handle_event.apply((event,)).get() for _ in range(3)]

    assert Charge.objects.filter(note=message).count() == 1
    assert results[0]["message"] == message
    assert results == [results[0]] * 3
    assert IdempotencyKey.objects.filter(
        scope="celery:tests.celery_tasks.handle_event", key=message
    ).exists()


@pytest.mark.django_db
def test_message_id_reused_with_another_payload_fails_with_mismatch():
    message = new_message()
    celery_tasks.handle_event.apply(({"id": message, "amount": 3},)).get()

    result = celery_tasks.handle_event.apply(({"id": message, "amount": 4},))

    with pytest.raises(IdempotencyKeyMismatch, match="different arguments"):
        result.get()
    assert Charge.objects.filter(note=message).count() == 1


@pytest.mark.django_db
def test_failed_task_stores_nothing_and_its_next_delivery_runs_it_again():
    message, task_id = new_message(), str(uuid.uuid4())

    failed = celery_tasks.flaky.apply((message, 1), task_id=task_id)

    with pytest.raises(ConnectionError):
        failed.get()
    # The atomic mode rolled the effect back with the claim: the key is free.
    assert Charge.objects.filter(note=message).count() == 0
    assert not IdempotencyKey.objects.filter(key=task_id).exists()

    first = celery_tasks.flaky.apply((message, 1), task_id=task_id).get()
    again = celery_tasks.flaky.apply((message, 1), task_id=task_id).get()

    assert first == again
    assert Charge.objects.filter(note=message).count() == 1


def _held_key(task_id: str, message: str) -> IdempotencyKey:
    """The key of ``charge(message, 7)`` with ``task_id``, claimed by a live lease elsewhere."""
    fingerprint = IdempotentCall(task_id, scope=CHARGE_SCOPE, fingerprint=[[message, 7], {}])
    return IdempotencyKeyFactory(
        in_progress=True,
        scope=CHARGE_SCOPE,
        key=task_id,
        fingerprint=fingerprint.fingerprint,
        method="CALL",
        path=celery_tasks.charge.name,
    )


@pytest.mark.django_db
def test_in_progress_delivery_in_eager_mode_raises_instead_of_retrying():
    message, task_id = new_message(), str(uuid.uuid4())
    _held_key(task_id, message)

    result = celery_tasks.charge.apply((message, 7), task_id=task_id)

    with pytest.raises(IdempotencyKeyInProgress, match="still running"):
        result.get()
    assert Charge.objects.filter(note=message).count() == 0


@pytest.mark.django_db
def test_in_progress_delivery_in_a_worker_is_published_again_without_using_up_retries():
    """As a worker runs it (not eager): the message again, for in 1 s, to the memory broker."""
    message, task_id = new_message(), str(uuid.uuid4())
    _held_key(task_id, message)
    task = celery_tasks.charge._get_current_object()  # the task, not the app's proxy of it
    task.push_request(id=task_id, args=[message, 7], kwargs={}, retries=2, called_directly=False)
    push_current_task(task)
    try:
        with pytest.raises(Retry) as retry:
            task.run(message, 7)
    finally:
        pop_current_task()
        task.pop_request()

    assert retry.value.when == 1
    assert isinstance(retry.value.exc, IdempotencyKeyInProgress)
    again = retry.value.sig
    assert list(again.args) == [message, 7]
    assert (again.options["task_id"], again.options["countdown"]) == (task_id, 1)
    assert again.options["retries"] == 2  # not counted against max_retries
    assert Charge.objects.filter(note=message).count() == 0


@pytest.mark.django_db
def test_in_progress_delivery_raises_when_retrying_is_turned_off():
    @idempotent_task(retry_in_progress=False)
    def work(message):
        raise AssertionError("the key is held: the body must not run")

    message, task_id = new_message(), str(uuid.uuid4())
    task = celery_tasks.charge._get_current_object()
    IdempotencyKeyFactory(
        in_progress=True,
        scope=CHARGE_SCOPE,
        key=task_id,
        fingerprint=IdempotentCall(task_id, scope="s", fingerprint=[[message], {}]).fingerprint,
    )
    task.push_request(id=task_id, called_directly=False)
    push_current_task(task)
    try:
        with pytest.raises(IdempotencyKeyInProgress):
            work(message)
    finally:
        pop_current_task()
        task.pop_request()


def test_task_called_directly_has_no_task_id_and_needs_a_key():
    with pytest.raises(IdempotencyKeyMissing, match="needs a key"):
        celery_tasks.charge(new_message(), 7)


@pytest.mark.django_db
def test_task_function_called_outside_celery_works_with_a_message_id_key():
    message = new_message()
    event = {"id": message, "amount": 5}

    first = celery_tasks.handle_event.run(event)
    again = celery_tasks.handle_event.run(event)

    assert first == again
    assert Charge.objects.filter(note=message).count() == 1
    assert IdempotencyKey.objects.get(key=message).scope == (
        "celery:tests.celery_tasks.handle_event"
    )


def test_async_function_is_refused():
    async def work():
        pass

    with pytest.raises(TypeError, match="async function"):
        idempotent_task(work)


# -- A real worker, Redis as broker and result backend ---------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory, django_db_setup) -> Iterator[Worker]:
    worker = Worker(tmp_path_factory.mktemp("celery"), os.environ["REDIS_URL"])
    try:
        yield worker
    finally:
        worker.stop()


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_same_message_delivered_three_times_has_one_effect(worker):
    """The issue's criterion: one message (one task id) delivered three times, one effect."""
    message, task_id = new_message(), str(uuid.uuid4())

    for delivery in range(1, 4):
        worker.send("tests.celery_tasks.charge", message, 7, task_id=task_id)
        successes = worker.wait_for("success", task_id, delivery)

    assert worker.effects(message) == 1
    results = [event["result"] for event in successes]
    assert results[0]["message"] == message
    assert results == [results[0]] * 3
    assert worker.result(task_id) == results[0]
    assert worker.keys(CHARGE_SCOPE, task_id) == [IdempotencyKey.State.COMPLETED]


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_same_message_id_in_three_messages_has_one_effect(worker):
    """Three messages (three task ids) carrying one message id: ``key=`` reads it, one effect."""
    message = new_message()
    event = {"id": message, "amount": 3}

    task_ids = []
    for _ in range(3):
        task_ids.append(worker.send("tests.celery_tasks.handle_event", event))
        worker.wait_for("success", task_ids[-1], 1)

    results = [worker.result(task_id) for task_id in task_ids]
    assert worker.effects(message) == 1
    assert results[0]["message"] == message
    assert results == [results[0]] * 3
    scope = "celery:tests.celery_tasks.handle_event"
    assert worker.keys(scope, message) == [IdempotencyKey.State.COMPLETED]


def dead_letters(worker: Worker, key: str) -> list[tuple[str, str, str]]:
    """The (task name, error type, error message) of the worker's dead letters for ``key``."""
    if worker.sqlite is None:
        rows = DeadLetter.objects.filter(key=key)
        return list(rows.values_list("task_name", "error_type", "error_message"))
    table = DeadLetter._meta.db_table
    with sqlite3.connect(worker.sqlite) as database:
        found = database.execute(
            f'SELECT "task_name", "error_type", "error_message" FROM "{table}" WHERE "key" = ?',
            [key],
        ).fetchall()
    database.close()
    return [tuple(row) for row in found]


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_message_failing_past_its_retries_in_a_worker_leaves_one_dead_letter(worker):
    """Celery's own autoretry runs it three times (max_retries=2); the last failure is kept."""
    message = new_message()

    task_id = worker.send("tests.celery_tasks.unreliable", message, 1000)
    worker.wait_for("retry", task_id, 2)
    result = worker.producer.AsyncResult(task_id)
    result.get(timeout=30, interval=0.05, propagate=False)

    assert result.state == "FAILURE"
    [(task_name, error_type, error_message)] = dead_letters(worker, task_id)
    assert task_name == "tests.celery_tasks.unreliable"
    assert error_type == "ConnectionError"
    assert error_message.startswith("failure ")
    assert worker.effects(message) == 0


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("task", "same_task_id"),
    [
        pytest.param("tests.celery_tasks.charge", True, id="atomic-task-id"),
        pytest.param("tests.celery_tasks.charge_leased", True, id="lease-task-id"),
        pytest.param("tests.celery_tasks.handle_event", False, id="atomic-message-id"),
    ],
)
def test_same_message_delivered_three_times_at_once_has_one_effect(worker, task, same_task_id):
    """Two worker processes race one message; the loser is retried and returns the result."""
    message, delay = new_message(), 1.0
    if same_task_id:
        task_id = str(uuid.uuid4())
        task_ids = [worker.send(task, message, 5, delay, task_id=task_id) for _ in range(3)]
        successes = worker.wait_for("success", task_id, 3)
        results = [event["result"] for event in successes]
    else:
        event = {"id": message, "amount": 5, "delay": delay}
        task_ids = [worker.send(task, event) for _ in range(3)]
        results = [worker.result(task_id) for task_id in task_ids]

    assert worker.effects(message) == 1
    assert results[0]["message"] == message
    assert results == [results[0]] * 3
    assert {worker.result(task_id)["message"] for task_id in task_ids} == {message}
    retried = [event for task_id in set(task_ids) for event in worker.retries(task_id)]
    assert all("IdempotencyKeyInProgress" in event["reason"] for event in retried)
    # Where the store answers "in progress" at once, the duplicate running beside the first
    # delivery is retried; on SQLite the atomic mode's duplicate waits for the database lock
    # instead, and then replays.
    if connection.features.has_select_for_update or "leased" in task:
        assert retried, worker.read_events()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl": 60}, "ttl must be a positive timedelta, not 60 (int)"),
        ({"wait": 1.5}, "wait must be a datetime.timedelta of zero or more"),
        ({"retry_in_progress": "no"}, "retry_in_progress must be True or False, not 'no'"),
        ({"key": "event-id"}, "key must be a function of the arguments"),
        ({"scope": lambda: "x"}, "scope must be a string"),
    ],
)
def test_a_wrong_option_is_refused_when_the_task_is_decorated(options, message):
    from django.core.exceptions import ImproperlyConfigured

    def charge(order_id): ...

    with pytest.raises(ImproperlyConfigured) as caught:
        idempotent_task(**options)(charge)

    assert str(caught.value).startswith(f"@idempotent_task on {__name__}.")
    assert message in str(caught.value)
