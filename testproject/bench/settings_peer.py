"""Settings of a benchmark server for one of the *other* idempotency packages.

``BENCH_PEER`` names the package; its server runs in that package's own virtualenv (made by
``benchmarks/load_benchmark.py`` under ``benchmarks/.work/``), where django-idempotency is
not installed. Database, Redis, middleware and DRF settings are those of ``bench.settings``,
so the only difference between the servers is the idempotency layer. Each package is wired as
its README says, with the options a multi-process deployment needs (a shared Redis lock and
store where the default is per process) and the replay answering with the stored status.
"""

from __future__ import annotations

import os

from testproject.settings import *  # noqa: F403
from testproject.settings import DATABASES, MIDDLEWARE

PEER = os.environ["BENCH_PEER"]
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")

DEBUG = False
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "bench",
]
MIDDLEWARE = ["bench.middleware.QueryCountMiddleware", *MIDDLEWARE]
ROOT_URLCONF = "bench.peer_urls"
DATABASES["default"]["CONN_MAX_AGE"] = None
CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": os.environ.get("BENCH_CACHE_PREFIX", PEER),
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
    },
}
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["bench.authentication.BenchAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
}

if PEER == "django-idempotency-key":
    # Opt-in per view (@idempotency_key); responses in the shared Redis cache; the lock
    # its README prescribes for several processes; replays keep the stored status
    # (the default answers them with 409).
    MIDDLEWARE.append("idempotency_key.middleware.ExemptIdempotencyKeyMiddleware")
    IDEMPOTENCY_KEY = {
        "STORAGE": {"CLASS": "idempotency_key.storage.CacheKeyStorage", "CACHE_NAME": "default"},
        "LOCK": {
            "CLASS": "idempotency_key.locks.redis.MultiProcessRedisLock",
            "LOCATION": REDIS_URL,
            "NAME": "bench-django-idempotency-key-lock",
        },
        "CONFLICT_STATUS_CODE": None,
    }
elif PEER == "djangorestframework-idempotency-key":
    INSTALLED_APPS.append("rest_framework_idempotency_key")
    MIDDLEWARE.append("rest_framework_idempotency_key.middleware.IdempotencyKeyMiddleware")
    IDEMPOTENCY_KEY_LOCK_TIMEOUT = 30
elif PEER == "drf-idem":
    INSTALLED_APPS.append("drf_idem")
    MIDDLEWARE.append("drf_idem.middleware.IdempotencyMiddleware")
    DRF_IDEM = {
        "HEADER": "HTTP_IDEMPOTENCY_KEY",
        "CACHE_BACKEND": "default",
        "ENDPOINTS": ["POST /bench/"],
    }
elif PEER == "drf-idempotency":
    # The database backend (its default), through its middleware: its @idempotent decorator
    # under DRF's @api_view, as its README shows, renders the DRF Response before DRF has
    # chosen a renderer and fails every request with a 500 (".accepted_renderer not set").
    INSTALLED_APPS.append("drf_idempotency")
    MIDDLEWARE.append("drf_idempotency.middleware.IdempotencyMiddleware")
elif PEER == "drf-idempotencykey":
    INSTALLED_APPS.append("drf_idempotencykey")
else:
    raise ValueError(f"BENCH_PEER: unknown package {PEER!r}")

# Errors of the views go to the server's log (benchmarks/.work/logs/gunicorn-*.log).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
}
