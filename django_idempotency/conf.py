"""Settings of django-idempotency: one typed property per ``IDEMPOTENCY_*`` setting."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

if TYPE_CHECKING:
    from django.http import HttpRequest

    from django_idempotency.stores import Store

DEFAULT_STORE = "django_idempotency.stores.DatabaseStore"
DEFAULT_SCOPE = "django_idempotency.core.user_scope"
DEFAULT_FINGERPRINT = "django_idempotency.core.request_fingerprint"
DEFAULT_SERIALIZER = "django_idempotency.functions.JSONSerializer"


class Settings:
    """Read ``IDEMPOTENCY_*`` settings at call time, with their defaults.

    Properties are uncached on purpose, so ``override_settings`` needs no reload logic.
    """

    @property
    def IDEMPOTENCY_HEADER(self) -> str:
        return getattr(settings, "IDEMPOTENCY_HEADER", "Idempotency-Key")

    @property
    def IDEMPOTENCY_REQUIRED(self) -> bool:
        return getattr(settings, "IDEMPOTENCY_REQUIRED", False)

    @property
    def IDEMPOTENCY_METHODS(self) -> frozenset[str]:
        methods = getattr(settings, "IDEMPOTENCY_METHODS", ("POST", "PATCH"))
        return frozenset(method.upper() for method in methods)

    @property
    def IDEMPOTENCY_TTL(self) -> timedelta:
        return getattr(settings, "IDEMPOTENCY_TTL", timedelta(hours=24))

    @property
    def IDEMPOTENCY_WAIT(self) -> timedelta:
        return getattr(settings, "IDEMPOTENCY_WAIT", timedelta(0))

    @property
    def IDEMPOTENCY_LOCK_TTL(self) -> timedelta:
        return getattr(settings, "IDEMPOTENCY_LOCK_TTL", timedelta(seconds=30))

    @property
    def IDEMPOTENCY_STORE(self) -> str:
        return getattr(settings, "IDEMPOTENCY_STORE", DEFAULT_STORE)

    @property
    def IDEMPOTENCY_SCOPE(self) -> str:
        return getattr(settings, "IDEMPOTENCY_SCOPE", DEFAULT_SCOPE)

    @property
    def IDEMPOTENCY_FINGERPRINT(self) -> str:
        return getattr(settings, "IDEMPOTENCY_FINGERPRINT", DEFAULT_FINGERPRINT)

    @property
    def IDEMPOTENCY_MAX_RESPONSE_SIZE(self) -> int:
        return getattr(settings, "IDEMPOTENCY_MAX_RESPONSE_SIZE", 1024 * 1024)

    @property
    def IDEMPOTENCY_STORE_SERVER_ERRORS(self) -> bool:
        return getattr(settings, "IDEMPOTENCY_STORE_SERVER_ERRORS", False)

    @property
    def IDEMPOTENCY_REPLAY_CACHE(self) -> str | None:
        return getattr(settings, "IDEMPOTENCY_REPLAY_CACHE", None)

    @property
    def IDEMPOTENCY_STORE_CACHE(self) -> str:
        return getattr(settings, "IDEMPOTENCY_STORE_CACHE", "default")

    @property
    def IDEMPOTENCY_FAIL_OPEN(self) -> bool:
        return getattr(settings, "IDEMPOTENCY_FAIL_OPEN", False)

    @property
    def IDEMPOTENCY_SERIALIZER(self) -> str:
        return getattr(settings, "IDEMPOTENCY_SERIALIZER", DEFAULT_SERIALIZER)

    @property
    def IDEMPOTENCY_PURGE_BATCH_SIZE(self) -> int:
        return getattr(settings, "IDEMPOTENCY_PURGE_BATCH_SIZE", 1000)

    @property
    def IDEMPOTENCY_MIDDLEWARE_PATHS(self) -> tuple[str, ...]:
        return tuple(getattr(settings, "IDEMPOTENCY_MIDDLEWARE_PATHS", ()))


conf = Settings()


@functools.cache
def get_store() -> Store:
    """The configured store, instantiated once (reset when ``IDEMPOTENCY_STORE`` changes)."""
    store_class: type[Store] = import_string(conf.IDEMPOTENCY_STORE)
    return store_class()


@functools.cache
def get_scope_function() -> Callable[[HttpRequest], str]:
    """The configured scope function (``IDEMPOTENCY_SCOPE``)."""
    function: Callable[[HttpRequest], str] = import_string(conf.IDEMPOTENCY_SCOPE)
    return function


@functools.cache
def get_fingerprint_function() -> Callable[[HttpRequest], str]:
    """The configured fingerprint function (``IDEMPOTENCY_FINGERPRINT``)."""
    function: Callable[[HttpRequest], str] = import_string(conf.IDEMPOTENCY_FINGERPRINT)
    return function


@functools.cache
def get_middleware_patterns() -> tuple[re.Pattern[str], ...]:
    """``IDEMPOTENCY_MIDDLEWARE_PATHS``, compiled once."""
    return tuple(re.compile(pattern) for pattern in conf.IDEMPOTENCY_MIDDLEWARE_PATHS)


_CACHED: dict[str, Any] = {
    "IDEMPOTENCY_STORE": get_store,
    "IDEMPOTENCY_SCOPE": get_scope_function,
    "IDEMPOTENCY_FINGERPRINT": get_fingerprint_function,
    "IDEMPOTENCY_MIDDLEWARE_PATHS": get_middleware_patterns,
}


@receiver(setting_changed)
def _reset_cached(*, setting: str, **kwargs: Any) -> None:
    if setting in _CACHED:
        _CACHED[setting].cache_clear()
