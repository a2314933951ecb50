"""Outbox relays as real processes: several at once, and one killed between publish and mark.

Each relay is ``manage.py idempotency_outbox_relay --once`` in a process of its own
(settings: ``tests/outbox_settings.py``, publishers: ``tests/outbox_publishers.py``) against
the test database this process wrote the events to. Four relays, each holding its first
batch until all four hold one, must publish every event exactly once between them (``SKIP
LOCKED``: without it, they would wait for each other's rows). A relay killed with SIGKILL
after publishing part of its batch to a real Celery worker (``tests/celery_support.py``), and
before marking it, must lose no event: the next relay publishes the batch again, with the
same message ids, and the worker's ``@idempotent_task`` consumer has one effect per event.

The relays and the worker need a database they share with this process, with row locks
(``SKIP LOCKED``): these tests run on PostgreSQL and MariaDB and are skipped on SQLite, whose
test database is in memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection, transaction

from django_idempotency.models import OutboxEvent
from django_idempotency.outbox import add_event
from tests.reliability_support import worker_database_url

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30  # seconds: for a relay to finish, or to reach its hold
CONSUMER = "tests.celery_tasks.outbox_consumer"

pytestmark = [
    pytest.mark.skipif(
        not connection.features.has_select_for_update,
        reason="needs a test database that relay processes share, with SKIP LOCKED: "
        "PostgreSQL or MariaDB (SQLite's test database is in memory)",
    ),
    pytest.mark.django_db(transaction=True),
]


def relay_env(directory: Path, base: dict[str, str] | None = None, **env: str) -> dict[str, str]:
    return {
        **(base if base is not None else os.environ),
        "DJANGO_SETTINGS_MODULE": "tests.outbox_settings",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "CELERY_TEST_DATABASE_URL": worker_database_url(),
        "OUTBOX_TEST_DELIVERIES": str(directory / "deliveries.jsonl"),
        **env,
    }


def start_relay(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "django", "idempotency_outbox_relay", "--once", *args]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(relay: subprocess.Popen[str]) -> str:
    output, _ = relay.communicate(timeout=TIMEOUT)
    assert relay.returncode == 0, output
    return output


def deliveries(directory: Path) -> list[dict[str, object]]:
    path = directory / "deliveries.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def add_events(count: int, topic: str, payload) -> list[OutboxEvent]:
    with transaction.atomic():
        return [add_event(topic, payload(n)) for n in range(count)]


def test_relays_started_together_publish_every_event_exactly_once(tmp_path, settings):
    settings.IDEMPOTENCY_OUTBOX_PUBLISHERS = {"*": "tests.outbox_publishers.to_file"}
    events = add_events(200, "orders.created", lambda n: {"n": n})
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # Each relay waits in its first batch, holding its rows, until all four are in theirs.
    env = relay_env(
        tmp_path, OUTBOX_TEST_DELAY="0.01", OUTBOX_TEST_BARRIER=str(barrier), OUTBOX_TEST_RELAYS="4"
    )

    relays = [start_relay(env, "--batch-size", "10") for _ in range(4)]
    outputs = [finish(relay) for relay in relays]

    delivered = deliveries(tmp_path)
    per_event = Counter(str(entry["message_id"]) for entry in delivered)
    assert per_event == Counter({str(event.message_id): 1 for event in events})
    per_relay = Counter(entry["pid"] for entry in delivered)
    assert len(per_relay) == 4, per_relay
    assert sum(int(output.split()[1]) for output in outputs if "Published" in output) == 200
    assert not OutboxEvent.objects.pending().exists()


@pytest.fixture(scope="module")
def worker(tmp_path_factory, django_db_setup) -> Iterator[object]:
    pytest.importorskip("celery", reason="celery is not installed (pip install 'celery[redis]')")
    from tests.celery_support import Worker

    if not os.environ.get("REDIS_URL"):
        pytest.skip("needs Redis: REDIS_URL is not set")
    worker = Worker(tmp_path_factory.mktemp("outbox-celery"), os.environ["REDIS_URL"])
    try:
        yield worker
    finally:
        worker.stop()


def wait_for_file(path: Path, relay: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if relay.poll() is not None:
            pytest.fail(f"the relay exited with {relay.returncode}:\n{relay.communicate()[0]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the relay never reached its hold after {TIMEOUT} s")
        time.sleep(0.05)


@pytest.mark.redis
def test_a_relay_killed_between_publish_and_mark_loses_nothing_and_duplicates_have_no_effect(
    tmp_path, settings, worker
):
    settings.IDEMPOTENCY_OUTBOX_PUBLISHERS = {CONSUMER: "django_idempotency.celery.publish_task"}
    run = uuid.uuid4().hex[:12]
    events = add_events(20, CONSUMER, lambda n: {"note": f"outbox-{run}-{n}", "amount": n})
    ids = [str(event.message_id) for event in events]
    marker = tmp_path / "held"
    env = relay_env(
        tmp_path,
        worker.env,
        OUTBOX_TEST_PUBLISHER="tests.outbox_publishers.celery_then_hold",
        OUTBOX_TEST_HOLD_MARKER=str(marker),
    )

    # The first relay publishes 8 of its batch of 20 to the worker and is killed there.
    first = start_relay({**env, "OUTBOX_TEST_HOLD_AFTER": "8"}, "--batch-size", "20")
    wait_for_file(marker, first)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=TIMEOUT)
    assert first.returncode == -signal.SIGKILL
    # Nothing was marked: the kill rolled the batch back, every event is still pending.
    assert OutboxEvent.objects.pending().count() == 20
    for message_id in ids[:8]:
        worker.wait_for("success", message_id, 1)

    # The next relay publishes all 20 again, with the same message ids (task ids). The
    # database may take a moment to end the dead relay's transaction and free its rows.
    outputs = []
    deadline = time.monotonic() + TIMEOUT
    while OutboxEvent.objects.pending().exists():
        assert time.monotonic() < deadline, f"events still pending: {outputs}"
        outputs.append(finish(start_relay(env, "--batch-size", "20")))
    assert sum(int(output.split()[1]) for output in outputs if "Published" in output) == 20

    # Every event was delivered: the 8 published before the kill twice, the others once ...
    published = Counter(str(entry["message_id"]) for entry in deliveries(tmp_path))
    assert published == Counter({**dict.fromkeys(ids[:8], 2), **dict.fromkeys(ids[8:], 1)})
    # ... and each had exactly one effect: the duplicate deliveries replayed the first result.
    for n, message_id in enumerate(ids):
        successes = worker.wait_for("success", message_id, published[message_id])
        results = [success["result"] for success in successes]
        assert results == [results[0]] * len(results)
        assert results[0]["message"] == f"outbox-{run}-{n}"
        assert worker.effects(f"outbox-{run}-{n}") == 1
    assert not OutboxEvent.objects.pending().exists()
