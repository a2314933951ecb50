"""A worker process for the concurrency tests: sends one request, in its own process.

Run as ``python -m tests.race_worker PATH KEY BODY`` with ``DJANGO_SETTINGS_MODULE`` and a
``DATABASE_URL`` naming the *test* database. With ``RACE_WORKER_HOLD`` set, the view blocks
inside the request (see ``tests/race_views.py``) so the test can kill this process there, as
a crashed or OOM-killed application server would die. ``RACE_WORKER_LOCK_TTL`` (seconds)
overrides ``IDEMPOTENCY_LOCK_TTL`` for the lease mode.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from datetime import timedelta


def main(path: str, key: str, body: str) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()

    from django.test import Client, override_settings

    lock_ttl = os.environ.get("RACE_WORKER_LOCK_TTL")
    overrides = (
        override_settings(IDEMPOTENCY_LOCK_TTL=timedelta(seconds=float(lock_ttl)))
        if lock_ttl
        else nullcontext()
    )
    with overrides:
        response = Client().post(
            path, body, content_type="application/json", headers={"Idempotency-Key": key}
        )
    print(response.status_code, response.content.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
