"""Settings for the outbox relay processes of ``tests/test_outbox_relay_processes.py``.

The Celery worker's settings (``tests/celery_settings.py``: the test database, and Redis under
the worker's key prefix), with the tests' Celery app as the current one (the app that
``publish_task`` sends through), and every topic published by the publisher that
``OUTBOX_TEST_PUBLISHER`` names (``tests/outbox_publishers.py``).
"""

from __future__ import annotations

import os
from importlib.util import find_spec

from tests.celery_settings import *  # noqa: F403

if find_spec("celery"):
    from tests.celery_app import app as celery_app  # noqa: F401  (made the current app)

IDEMPOTENCY_OUTBOX_PUBLISHERS = {
    "*": os.environ.get("OUTBOX_TEST_PUBLISHER", "tests.outbox_publishers.to_file")
}
