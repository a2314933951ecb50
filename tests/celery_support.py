"""A real Celery worker for ``tests/test_celery.py``: Redis as broker and result backend.

``Worker`` runs ``celery -A tests.celery_app worker`` (prefork, two processes, ``acks_late``)
on the tasks of ``tests/celery_tasks.py``, against the test's database: the test database
pytest-django created on PostgreSQL and MariaDB (as ``tests/reliability_support.py`` points
gunicorn at it), or an SQLite file of its own, migrated here, since the suite's SQLite test
database is in memory. Every Redis key the worker and the test's producer write starts with
a prefix of the worker's own, and only those keys are deleted: never a FLUSHDB.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.db import connection

from django_idempotency.models import IdempotencyKey
from tests.celery_app import configure
from tests.models import Charge
from tests.reliability_support import worker_database_url

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20  # seconds: for the worker to start or stop, and for each awaited event


class Worker:
    """A Celery worker process (and its two pool processes) and a producer to send it messages."""

    def __init__(self, directory: Path, redis_url: str) -> None:
        self.directory = directory
        self.redis_url = redis_url
        self.prefix = f"idempotency-celery-{uuid.uuid4().hex[:12]}:"
        self.queue = f"idempotency-celery-{uuid.uuid4().hex[:8]}"
        self.events = directory / "events.jsonl"
        self.log = directory / "worker.log"
        self.sqlite: Path | None = None
        if connection.vendor == "sqlite":
            self.sqlite = directory / "worker.sqlite3"
            database_url = f"sqlite:///{self.sqlite}"
        else:
            database_url = worker_database_url()
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.celery_settings",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "CELERY_TEST_DATABASE_URL": database_url,
            "CELERY_TEST_REDIS_URL": redis_url,
            "CELERY_TEST_KEY_PREFIX": self.prefix,
            "CELERY_TEST_QUEUE": self.queue,
            "CELERY_TEST_EVENTS": str(self.events),
        }
        self.producer = Celery("tests-producer", set_as_current=False)
        configure(self.producer, redis_url, self.prefix, self.queue)
        self.process: subprocess.Popen[bytes] | None = None
        if self.sqlite is not None:
            self._migrate()
        self._start()

    def _migrate(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "django", "migrate", "--run-syncdb", "--no-input", "-v", "0"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def _start(self) -> None:
        command = [
            *(sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker"),
            *("--pool", "prefork", "--concurrency", "2", "--queues", self.queue),
            *("--hostname", f"{self.queue}@%h", "--loglevel", "INFO"),
            # Nothing to learn from other workers: start at once.
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        ]
        with self.log.open("wb") as log:
            # A session of its own: teardown can kill the pool processes with their parent.
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + TIMEOUT
        while " ready." not in self.output():
            if self.process.poll() is not None:
                pytest.fail(f"the worker exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the worker was not ready after {TIMEOUT} s:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Warm shutdown; SIGKILL to the whole process group when it takes too long."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(TIMEOUT)
        finally:
            self.producer.close()
            self.delete_keys()

    def delete_keys(self) -> None:
        """Delete the Redis keys under this worker's prefix (SCAN, never KEYS or FLUSHDB)."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    # Messages and what became of them.

    def send(self, task: str, *args: Any, task_id: str | None = None) -> str:
        """Publish a message for ``task``; its task id."""
        return str(self.producer.send_task(task, args, task_id=task_id, queue=self.queue).id)

    def result(self, task_id: str) -> Any:
        """The result the result backend holds for ``task_id`` (once it is final)."""
        return self.producer.AsyncResult(task_id).get(timeout=TIMEOUT, interval=0.05)

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        lines = self.events.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_for(self, event: str, task_id: str, count: int) -> list[dict[str, Any]]:
        """Wait until ``task_id`` had ``count`` ``event`` events (success or retry); them."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            found = [e for e in self.read_events() if e["event"] == event and e["id"] == task_id]
            if len(found) >= count:
                return found
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"the worker exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{task_id} had {len(found)} of {count} {event} events after {TIMEOUT} s:\n"
                    f"{self.read_events()}\n{self.output()}"
                )
            time.sleep(0.05)

    def retries(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.read_events() if e["event"] == "retry" and e["id"] == task_id]

    # The database the worker writes to.

    def effects(self, message: str) -> int:
        """How many ``Charge`` rows (effects) the message has."""
        if self.sqlite is None:
            return Charge.objects.filter(note=message).count()
        with sqlite3.connect(self.sqlite) as database:
            (count,) = database.execute(
                f'SELECT COUNT(*) FROM "{Charge._meta.db_table}" WHERE "note" = ?', [message]
            ).fetchone()
        database.close()
        return int(count)

    def keys(self, scope: str, key: str) -> list[str]:
        """The states of the idempotency keys ``(scope, key)`` the worker stored (one, or none)."""
        if self.sqlite is None:
            rows = IdempotencyKey.objects.filter(scope=scope, key=key)
            return list(rows.values_list("state", flat=True))
        table = IdempotencyKey._meta.db_table
        with sqlite3.connect(self.sqlite) as database:
            states = database.execute(
                f'SELECT "state" FROM "{table}" WHERE "scope" = ? AND "key" = ?', [scope, key]
            ).fetchall()
        database.close()
        return [state for (state,) in states]
