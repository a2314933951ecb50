"""The Celery app of ``tests/test_celery.py``, configured from the environment.

In the test process nothing is set: tasks run eagerly through ``apply()``, with an in-memory
broker that is never used. The worker the real-worker tests start gets ``CELERY_TEST_REDIS_URL``
(broker and result backend), ``CELERY_TEST_KEY_PREFIX`` (prefixed to every Redis key the
worker writes, so the test deletes exactly its own) and ``CELERY_TEST_QUEUE``.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("CELERY_TEST_REDIS_URL")
KEY_PREFIX = os.environ.get("CELERY_TEST_KEY_PREFIX", "")


def configure(app: Celery, redis_url: str | None, key_prefix: str, queue: str) -> None:
    """Point ``app`` at ``redis_url`` (or at nothing), with the tests' delivery settings."""
    app.conf.update(
        broker_url=redis_url or "memory://",
        result_backend=redis_url,
        broker_transport_options={"global_keyprefix": key_prefix},
        result_backend_transport_options={"global_keyprefix": key_prefix},
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        # At-least-once delivery, as in production: a message is acknowledged after its task
        # ran, and a worker holds one message per process at a time, so that duplicates of
        # one message really run side by side in two processes.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        result_expires=300,
    )


app = Celery("tests", include=["tests.celery_tasks"])
configure(app, REDIS_URL, KEY_PREFIX, os.environ.get("CELERY_TEST_QUEUE", "celery"))
