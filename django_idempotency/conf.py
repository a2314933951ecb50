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

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# RFC 9110 "token": the characters a header field name (and a method name) may hold.
# Use fullmatch(): "$" would also match before a final newline ("POST\n").
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# -- Validators ---------------------------------------------------------------------------
#
# One set, used by the system checks (for settings) and by every adapter's per-view or
# per-function options (the decorator, the mixin, idempotent_function, the Celery helper):
# a value is refused with the same sentence wherever it enters.


class InvalidValue(ValueError):
    """A setting's or an option's value, refused.

    ``problem`` completes a sentence that starts with the value's name ("IDEMPOTENCY_TTL
    must be ..."); ``hint`` says how to fix it, when that adds something.
    """

    def __init__(self, problem: str, hint: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


def describe(value: object) -> str:
    """``value`` as an error message shows it: its repr and its type."""
    return f"{value!r} ({type(value).__name__})"


def validate_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue(f"must be True or False, not {describe(value)}.")
    return value


def validate_methods(value: object) -> frozenset[str]:
    """A collection of HTTP method names, upper-cased. A string is refused: it is a sequence
    of letters, and ``"POST"`` would otherwise mean the methods P, O, S and T."""
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(method, str) and TOKEN.fullmatch(method) for method in value
    ):
        raise InvalidValue(
            f"must be a list or tuple of HTTP method names, not {describe(value)}.",
            hint='For example ("POST", "PATCH", "PUT", "DELETE").',
        )
    return frozenset(method.upper() for method in value)


#: The longest duration a setting or option may be: 100 years, far within what every database
#: and Redis can add to their clocks (a larger TTL overflowed at request time).
MAX_DURATION = timedelta(days=36500)


def validate_duration(value: object, *, assign: str, zero_allowed: bool) -> timedelta:
    """A ``timedelta``, positive (or zero too) and at most :data:`MAX_DURATION`. ``assign`` is
    how the user sets it (``IDEMPOTENCY_TTL = ``, ``ttl=``, ``idempotency_ttl = ``), for the
    hint."""
    if isinstance(value, timedelta) and (
        timedelta(0) < value <= MAX_DURATION or (zero_allowed and value == timedelta(0))
    ):
        return value
    wanted = "a datetime.timedelta of zero or more" if zero_allowed else "a positive timedelta"
    if isinstance(value, timedelta) and value > MAX_DURATION:
        wanted = f"a timedelta of at most {MAX_DURATION.days} days"
    raise InvalidValue(
        f"must be {wanted}, not {describe(value)}.",
        hint=f"Durations are timedelta objects: {assign}timedelta(seconds=30).",
    )


def validate_integer(value: object, *, minimum: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    wanted = "a positive integer" if minimum == 1 else f"an integer of {minimum} or more"
    raise InvalidValue(f"must be {wanted}, not {describe(value)}.")


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
