"""Settings for the test suite: SQLite in memory unless DATABASE_URL names another database."""

from __future__ import annotations

import os
from importlib.util import find_spec

import dj_database_url

SECRET_KEY = "django-idempotency-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_idempotency",
    "tests",
]
# The tox "minimal" env runs the suite without DRF: its tests and views are left out there.
if find_spec("rest_framework"):
    INSTALLED_APPS.insert(-2, "rest_framework")
# drf-spectacular (the `openapi` extra) is optional too: tests/test_openapi.py skips without it.
HAS_SPECTACULAR = bool(find_spec("rest_framework") and find_spec("drf_spectacular"))
if HAS_SPECTACULAR:
    INSTALLED_APPS.insert(-2, "drf_spectacular")

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {"default": dj_database_url.config(default="sqlite://:memory:")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"].setdefault("OPTIONS", {})["transaction_mode"] = "IMMEDIATE"
    # Races need a file (an in-memory database locks whole tables across threads).
    if sqlite_test_file := os.environ.get("SQLITE_TEST_FILE"):
        DATABASES["default"]["TEST"] = {"NAME": sqlite_test_file}
# Parallel runs against one server (tox envs, CI jobs) each get their own test database.
elif test_name := os.environ.get("TEST_DATABASE_NAME"):
    DATABASES["default"]["TEST"] = {"NAME": test_name}

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
if REDIS_URL := os.environ.get("REDIS_URL"):
    CACHES["redis"] = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": REDIS_URL}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
if HAS_SPECTACULAR:
    REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "drf_spectacular.openapi.AutoSchema"

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
