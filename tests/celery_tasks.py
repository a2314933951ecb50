"""Idempotent Celery tasks whose effect is a ``Charge`` row, for ``tests/test_celery.py``.

Each run of a task body creates one ``Charge`` whose ``note`` is the message's id, so a test
counts how many times a message had its effect. In a worker, ``CELERY_TEST_EVENTS`` names a
file that receives one JSON line per task that succeeded (with its result) or was retried
(with the reason), written by Celery's own signals.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import signals

from django_idempotency.celery import idempotent_task
from tests.celery_app import app
from tests.models import Charge

#: How often each message's body failed on purpose, in this process (``flaky``).
FAILURES: dict[str, int] = {}


def _effect(message: str, amount: int, delay: float) -> dict[str, Any]:
    charge = Charge.objects.create(amount=amount, note=message)
    time.sleep(delay)  # long enough for a duplicate to arrive while the first one runs
    return {"charge": charge.pk, "message": message, "amount": amount}


@app.task(bind=True)
@idempotent_task
def charge(self: Any, message: str, amount: int, delay: float = 0.0) -> dict[str, Any]:
    """Keyed by the task id; the atomic mode (on the database store)."""
    return _effect(message, amount, delay)


@app.task(bind=True)
@idempotent_task(atomic=False)
def charge_leased(self: Any, message: str, amount: int, delay: float = 0.0) -> dict[str, Any]:
    """Keyed by the task id; the lease mode."""
    return _effect(message, amount, delay)


@app.task
@idempotent_task(key=lambda event: event["id"])
def handle_event(event: dict[str, Any]) -> dict[str, Any]:
    """Not bound; keyed by the id the message carries, whatever its task id."""
    return _effect(event["id"], event["amount"], event.get("delay", 0.0))


@app.task
@idempotent_task
def flaky(message: str, failures: int) -> dict[str, Any]:
    """Fails its first ``failures`` runs for ``message`` after writing its effect."""
    result = _effect(message, 1, 0.0)
    if FAILURES.get(message, 0) < failures:
        FAILURES[message] = FAILURES.get(message, 0) + 1
        raise ConnectionError(f"failure {FAILURES[message]} of {message}")
    return result


@app.task(bind=True)
@idempotent_task(atomic=False)
def import_file(self: Any, message: str) -> dict[str, Any]:
    """Two phases; the first run for ``message`` fails between them, as a lost worker would."""
    call = self.request.idempotency
    download = call.phase(
        "download", lambda: Charge.objects.create(amount=1, note=f"{message}:download").pk
    )
    if FAILURES.get(message, 0) < 1:
        FAILURES[message] = 1
        raise ConnectionError(f"lost the connection after downloading {message}")
    imported = call.phase(
        "import", lambda: Charge.objects.create(amount=2, note=f"{message}:import").pk
    )
    return {"download": download, "import": imported, "resumed_after": call.resumed_after}


@app.task(bind=True, autoretry_for=(ConnectionError,), max_retries=2, default_retry_delay=0)
@idempotent_task
def unreliable(self: Any, message: str, failures: int) -> dict[str, Any]:
    """Retried on ``ConnectionError`` twice; fails its first ``failures`` runs for ``message``."""
    if FAILURES.get(message, 0) < failures:
        FAILURES[message] = FAILURES.get(message, 0) + 1
        raise ConnectionError(f"failure {FAILURES[message]} of {message}")
    return _effect(message, 1, 0.0)


@app.task(autoretry_for=(ConnectionError,), max_retries=None, default_retry_delay=0)
@idempotent_task(key=lambda event: event["id"])
def retried_for_ever(event: dict[str, Any]) -> dict[str, Any]:
    """Never exhausts its retries (``max_retries=None``); fails its first run."""
    if FAILURES.get(event["id"], 0) < 1:
        FAILURES[event["id"]] = 1
        raise ConnectionError(f"failure of {event['id']}")
    return _effect(event["id"], 1, 0.0)


@app.task(bind=True)
@idempotent_task
def outbox_consumer(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """The consumer of outbox events (``tests/test_outbox*.py``): the relay publishes each
    event with its message id as the task id, the key here."""
    return _effect(payload["note"], payload["amount"], 0.0)


def _record(**event: Any) -> None:
    if path := os.environ.get("CELERY_TEST_EVENTS"):
        # One short write with O_APPEND: lines of concurrent processes never interleave.
        with open(path, "a", encoding="utf-8") as events:
            events.write(json.dumps({**event, "pid": os.getpid()}) + "\n")


@signals.task_success.connect
def _succeeded(sender: Any, result: Any, **kwargs: Any) -> None:
    _record(event="success", task=sender.name, id=sender.request.id, result=result)


@signals.task_retry.connect
def _retried(sender: Any, request: Any, reason: Any, **kwargs: Any) -> None:
    _record(event="retry", task=sender.name, id=request.id, reason=repr(reason))
