"""Settings of django-idempotency's benchmark server: the demo's settings, tuned for load.

Read by ``benchmarks/load_benchmark.py`` through ``DJANGO_SETTINGS_MODULE=bench.settings``; the
environment chooses the database, Redis and the store, as for the demo.
"""

from __future__ import annotations

import os

from testproject.settings import *  # noqa: F403
from testproject.settings import DATABASES, INSTALLED_APPS, MIDDLEWARE

DEBUG = False  # DEBUG keeps every query in memory: never under load
INSTALLED_APPS = [*INSTALLED_APPS, "bench"]
MIDDLEWARE = ["bench.middleware.QueryCountMiddleware", *MIDDLEWARE]
ROOT_URLCONF = "bench.urls"
# Persistent connections, as a production deployment has them; every server gets the same.
DATABASES["default"]["CONN_MAX_AGE"] = None
if os.environ.get("BENCH_SERVER_SIDE_BINDING"):
    # benchmarks/protocols.py: psycopg binds parameters on the server and prepares a statement
    # once it has run it five times (its prepare_threshold).
    DATABASES["default"].setdefault("OPTIONS", {})["server_side_binding"] = True
if os.environ.get("BENCH_LOCK_TIMEOUT"):
    # benchmarks/protocols.py: how long a duplicate's claim may wait on an uncommitted one.
    DATABASES["default"].setdefault("OPTIONS", {})["options"] = (
        f"-c lock_timeout={os.environ['BENCH_LOCK_TIMEOUT']}"
    )
if "CACHES" in globals():  # REDIS_URL is set
    # Several benchmark servers share one Redis database: each keeps to its own prefix.
    CACHES["default"]["KEY_PREFIX"] = os.environ.get("BENCH_CACHE_PREFIX", "bench")  # noqa: F405

# Every view uses the same cheap authentication, plain JSON in and out.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["bench.authentication.BenchAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
}

# Errors of the views go to the server's log (benchmarks/.work/logs/gunicorn-*.log).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
}
