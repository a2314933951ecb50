"""Settings of the demo project: SQLite by default, any database through ``DATABASE_URL``.

Development settings only: the secret key and ``DEBUG`` have demo defaults.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-idempotency-demo-only")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_idempotency",
    "shop",
    "agent",
]
try:
    import drf_spectacular  # noqa: F401
except ImportError:  # optional: the OpenAPI schema at /api/schema/ needs it
    pass
else:
    INSTALLED_APPS.append("drf_spectacular")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "testproject.urls"
WSGI_APPLICATION = "testproject.wsgi.application"
ASGI_APPLICATION = "testproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _parse_database_url(url: str) -> dict[str, Any]:
    """A tiny ``DATABASE_URL`` parser, used only when dj-database-url is not installed."""
    parts = urlsplit(url)
    engines = {
        "postgres": "django.db.backends.postgresql",
        "postgresql": "django.db.backends.postgresql",
        "pgsql": "django.db.backends.postgresql",
        "mysql": "django.db.backends.mysql",
        "mariadb": "django.db.backends.mysql",
        "sqlite": "django.db.backends.sqlite3",
    }
    if parts.scheme not in engines:
        raise ValueError(f"DATABASE_URL: unsupported scheme {parts.scheme!r}")
    if parts.scheme == "sqlite":
        # sqlite:///relative.sqlite3, sqlite:////absolute/path.sqlite3, sqlite://:memory:
        name = ":memory:" if parts.netloc == ":memory:" else unquote(parts.path[1:])
        return {"ENGINE": engines["sqlite"], "NAME": name}
    return {
        "ENGINE": engines[parts.scheme],
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": dict(parse_qsl(parts.query)),
    }


# An empty DATABASE_URL (as CI matrices and env files often set) means the default too.
_database_url = os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
try:
    import dj_database_url
except ImportError:  # the demo needs nothing beyond Django and DRF
    DATABASES = {"default": _parse_database_url(_database_url)}
else:
    DATABASES = {"default": dj_database_url.parse(_database_url)}

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A test run's database: a file, as threads racing one key need (an in-memory database
    # locks whole tables across threads).
    if sqlite_test_file := os.environ.get("SQLITE_TEST_FILE"):
        DATABASES["default"]["TEST"] = {"NAME": sqlite_test_file}
    DATABASES["default"]["OPTIONS"] = {
        **DATABASES["default"].get("OPTIONS", {}),
        # SQLite has no row locks, so concurrent requests for one idempotency key serialise
        # on its database-wide write lock. Django's default DEFERRED transactions take that
        # lock only at their first write, and a transaction that has already read when it
        # finds the lock taken fails at once with "database is locked" (SQLite will not wait
        # there, as waiting could deadlock). IMMEDIATE takes the write lock at BEGIN, where
        # the busy timeout applies, so duplicates queue behind the first request and then
        # replay its stored response instead of failing.
        "transaction_mode": "IMMEDIATE",
        # How long (seconds) a writer queues for the lock: longer than the slowest request
        # plus the queue in front of it (the demo's burst of 16 duplicate payments).
        "timeout": 30,
    }

# REDIS_URL is optional: it makes Redis (through django-redis) the default cache, which the
# cache store (IDEMPOTENCY_STORE=django_idempotency.stores.CacheStore) or the replay cache
# (IDEMPOTENCY_REPLAY_CACHE=default) can use. Timeouts bound how long a request waits for a
# Redis that stops answering: it then gets a 503 (system check django_idempotency.W005).
if REDIS_URL := os.environ.get("REDIS_URL"):
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
        },
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGIN_URL = "/admin/login/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # The browsable API and the admin's session; tokens and passwords for API clients.
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}
if "drf_spectacular" in INSTALLED_APPS:
    REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "drf_spectacular.openapi.AutoSchema"
    SPECTACULAR_SETTINGS = {"TITLE": "django-idempotency demo shop", "VERSION": "1.0.0"}

# django-idempotency: the defaults, spelled out so the demo shows where they live.
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_METHODS = ["POST", "PATCH"]
IDEMPOTENCY_TTL = timedelta(hours=24)
IDEMPOTENCY_LEASE = timedelta(seconds=30)
IDEMPOTENCY_STORE = os.environ.get("IDEMPOTENCY_STORE", "django_idempotency.stores.DatabaseStore")
IDEMPOTENCY_REPLAY_CACHE = os.environ.get("IDEMPOTENCY_REPLAY_CACHE") or None
# The transactional outbox: pay_order writes shop.order_paid events, which
# `manage.py idempotency_outbox_relay` hands to the shop's publisher (it logs them).
IDEMPOTENCY_OUTBOX_PUBLISHERS = {"shop.order_paid": "shop.events.log_event"}
# Stored responses are encrypted at rest when IDEMPOTENCY_ENCRYPTION_KEY holds a Fernet key
# (docs/privacy.md says how to make one); none by default.
_ENCRYPTION_KEY = os.environ.get("IDEMPOTENCY_ENCRYPTION_KEY")
IDEMPOTENCY_ENCRYPTION_KEYS = [_ENCRYPTION_KEY] if _ENCRYPTION_KEY else []

# How long the fake payment provider takes to charge a card. The demo command raises it so
# that its burst of duplicate payments overlaps the first one.
SHOP_PAYMENT_PROVIDER_DELAY = timedelta(
    seconds=float(os.environ.get("SHOP_PAYMENT_PROVIDER_DELAY", "0"))
)
