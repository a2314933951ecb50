"""Settings for the app that tests/test_replicas.py serves with gunicorn: a primary and a replica.

``REPLICA_PRIMARY_URL`` and ``REPLICA_REPLICA_URL`` name the two PostgreSQL servers (a private
primary and its streaming replica, tests/reliability_support.py). The router sends every read
to the replica and every write to the primary, as read-replica routers do; django-idempotency
reads and writes its keys on ``IDEMPOTENCY_DATABASE`` all the same.
"""

from __future__ import annotations

import os
from typing import Any

import dj_database_url

from tests.reliability_settings import *  # noqa: F403

ROOT_URLCONF = "tests.replica_views"
# A short connect timeout, so that requests while the primary is down fail fast.
DATABASES = {
    "default": dj_database_url.parse(os.environ["REPLICA_PRIMARY_URL"]),
    "replica": dj_database_url.parse(os.environ["REPLICA_REPLICA_URL"]),
}
for _database in DATABASES.values():
    _database["OPTIONS"] = {"connect_timeout": 2}
DATABASES["replica"]["TEST"] = {"MIRROR": "default"}
DATABASE_ROUTERS = ["tests.replica_settings.ReadsFromTheReplica"]
IDEMPOTENCY_DATABASE = "default"


class ReadsFromTheReplica:
    """Reads from ``replica``, writes to ``default``: the router of docs/scaling.md."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "replica"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return db == "default"
