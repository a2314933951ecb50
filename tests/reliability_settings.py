"""Settings for the app the reliability tests serve with gunicorn (tests/reliability_support.py).

The suite's settings, on the database named by ``RELIABILITY_DATABASE_URL`` (the suite's test
database, or a private PostgreSQL server), or with no database at all for the cache store
(``RELIABILITY_STORE=cache``: keys, and the views' effect counters, in Redis under the key
prefix ``RELIABILITY_KEY_PREFIX``). ``RELIABILITY_LOCK_TTL`` (seconds) is the lease.
"""

from __future__ import annotations

import os
from datetime import timedelta

import dj_database_url

from tests.settings import *  # noqa: F403

ROOT_URLCONF = "tests.reliability_views"
MIDDLEWARE = ["tests.reliability_views.served_by", *MIDDLEWARE]  # noqa: F405
if database_url := os.environ.get("RELIABILITY_DATABASE_URL"):
    # A short connect timeout, so that requests while the database is down fail fast.
    DATABASES = {"default": dj_database_url.parse(database_url)}
    if DATABASES["default"]["ENGINE"].endswith("postgresql"):
        DATABASES["default"]["OPTIONS"] = {"connect_timeout": 2}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
if os.environ.get("RELIABILITY_STORE") == "cache":
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "store": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": os.environ["REDIS_URL"],
            "KEY_PREFIX": os.environ["RELIABILITY_KEY_PREFIX"],
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 2},
        },
    }
    IDEMPOTENCY_STORE = "django_idempotency.stores.CacheStore"
    IDEMPOTENCY_STORE_CACHE = "store"
IDEMPOTENCY_LOCK_TTL = timedelta(seconds=float(os.environ.get("RELIABILITY_LOCK_TTL", "30")))
