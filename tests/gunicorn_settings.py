"""Settings for the test app served by gunicorn (tests/test_cache_store_processes.py).

The suite's settings, with the cache store on the suite's Redis (``REDIS_URL``) under the key
prefix the test chose (``GUNICORN_TEST_KEY_PREFIX``). The app has no database of its own: its
views count their runs in Redis, which every worker process and the test can see, whatever
database the suite runs on (pytest-django's SQLite test database is in one process's memory).
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403

ROOT_URLCONF = "tests.gunicorn_views"
MIDDLEWARE = ["tests.gunicorn_views.served_by", *MIDDLEWARE]  # noqa: F405
# Never used by the views; set so that the app never opens the suite's test database.
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "store": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ["REDIS_URL"],
        "KEY_PREFIX": os.environ["GUNICORN_TEST_KEY_PREFIX"],
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 2},
    },
}
IDEMPOTENCY_STORE = "django_idempotency.stores.CacheStore"
IDEMPOTENCY_STORE_CACHE = "store"
