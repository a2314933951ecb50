"""Settings for the Celery worker of ``tests/test_celery.py``: the suite's, on another database.

``CELERY_TEST_DATABASE_URL`` names the database the worker writes to: the test database
pytest-django created (PostgreSQL, MariaDB), or an SQLite file of the test's own (the suite's
SQLite test database is in memory, out of another process's reach).
"""

from __future__ import annotations

import os

import dj_database_url

from tests.settings import *  # noqa: F403

DATABASES = {"default": dj_database_url.parse(os.environ["CELERY_TEST_DATABASE_URL"])}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # As in tests/settings.py: writers queue for SQLite's lock instead of failing.
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE"}
