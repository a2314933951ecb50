"""Outbox publishers for ``tests/test_outbox*.py``.

In the test process, ``record`` keeps each event it is handed in ``DELIVERED``. In a relay
process (``tests/outbox_settings.py``), ``to_file`` appends one JSON line per event to the file
``OUTBOX_TEST_DELIVERIES`` names (with ``OUTBOX_TEST_BARRIER``, not before every relay of
the test is inside its first batch), and ``celery_then_hold`` sends the event to a real Celery
worker and, after ``OUTBOX_TEST_HOLD_AFTER`` events, writes ``OUTBOX_TEST_HOLD_MARKER`` and
blocks: the relay has published those events and not marked them, and the test kills it there.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from django.db import DatabaseError, connection

from django_idempotency.models import OutboxEvent

#: The events ``record`` was handed, in order: (topic, message id, payload, headers).
DELIVERED: list[tuple[str, str, Any, dict[str, str]]] = []
#: Topics whose publication ``flaky`` fails.
FAILING: set[str] = set()


def record(event: OutboxEvent) -> None:
    DELIVERED.append((event.topic, str(event.message_id), event.payload, dict(event.headers)))


def flaky(event: OutboxEvent) -> None:
    """Fails for the topics in ``FAILING`` (after a failed query), records the others."""
    if event.topic in FAILING:
        # A failed query first: on PostgreSQL it aborts the transaction it runs in.
        with contextlib.suppress(DatabaseError), connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table_for_the_outbox_tests")
        raise ConnectionError(f"the broker is down for {event.topic}")
    record(event)


def _barrier() -> None:
    """Wait until ``OUTBOX_TEST_RELAYS`` relays have reached their first publication."""
    global _arrived
    directory = os.environ.get("OUTBOX_TEST_BARRIER")
    if directory is None or _arrived:
        return
    _arrived = True
    Path(directory, str(os.getpid())).touch()
    deadline = time.monotonic() + 20
    while len(os.listdir(directory)) < int(os.environ["OUTBOX_TEST_RELAYS"]):
        if time.monotonic() > deadline:
            raise SystemExit("the other relays never reached their first batch")
        time.sleep(0.01)


_arrived = False


def to_file(event: OutboxEvent) -> None:
    _barrier()
    delay = float(os.environ.get("OUTBOX_TEST_DELAY", "0"))
    time.sleep(delay)  # long enough for relays started together to overlap
    line = json.dumps({"pid": os.getpid(), "message_id": str(event.message_id)})
    # One short write with O_APPEND: lines of concurrent processes never interleave.
    with open(os.environ["OUTBOX_TEST_DELIVERIES"], "a", encoding="utf-8") as deliveries:
        deliveries.write(line + "\n")


_sent = 0


def celery_then_hold(event: OutboxEvent) -> None:
    from django_idempotency.celery import publish_task

    global _sent
    publish_task(event)
    to_file(event)
    _sent += 1
    if _sent == int(os.environ.get("OUTBOX_TEST_HOLD_AFTER", "0")):
        with open(os.environ["OUTBOX_TEST_HOLD_MARKER"], "w", encoding="utf-8") as marker:
            marker.write(str(os.getpid()))
        time.sleep(60)  # killed here: published, not marked
