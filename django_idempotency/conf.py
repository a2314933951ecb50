"""Settings of django-idempotency: ``DEFAULTS``, the validators, and one typed property each."""

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


#: The status classes ``IDEMPOTENCY_STORED_STATUSES`` (and ``stored_statuses=``) may name.
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")


def validate_statuses(value: object) -> frozenset[str | int] | None:
    """``None``, or a collection of status classes (``"2xx"``) and status codes (``409``),
    kept as a frozenset with the classes lower-cased. A string is refused, as for methods;
    so is an empty collection, which would store nothing and protect nothing."""
    if value is None:
        return None

    def valid(item: object) -> bool:
        if isinstance(item, str):
            return item.lower() in STATUS_CLASSES
        return isinstance(item, int) and not isinstance(item, bool) and 200 <= item <= 599

    if not isinstance(value, (list, tuple, set, frozenset)) or not all(valid(i) for i in value):
        raise InvalidValue(
            'must be None, or a list or tuple of status classes ("2xx", "4xx") and '
            f"status codes (200 to 599), not {describe(value)}.",
            hint='For example ("2xx", 404, 410).',
        )
    if not value:
        raise InvalidValue(
            "must name at least one status class or code: an empty collection would store no "
            "response, so no retry would ever be replayed.",
            hint='For example ("2xx",); None keeps the default rule.',
        )
    return frozenset(item.lower() if isinstance(item, str) else item for item in value)


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


#: The largest outbox batch: one transaction holds the row locks of a whole batch.
MAX_BATCH_SIZE = 10_000


def validate_integer(value: object, *, minimum: int, maximum: int | None = None) -> int:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    ):
        return value
    wanted = "a positive integer" if minimum == 1 else f"an integer of {minimum} or more"
    if maximum is not None:
        wanted = f"an integer from {minimum} to {maximum:,}"
    raise InvalidValue(f"must be {wanted}, not {describe(value)}.")


#: Every setting and its default: the one place both are written. ``conf``, the system
#: checks and ``manage.py idempotency_status`` read it; docs/settings.md describes each.
DEFAULTS: dict[str, Any] = {
    "IDEMPOTENCY_HEADER": "Idempotency-Key",
    "IDEMPOTENCY_REQUIRED": False,
    "IDEMPOTENCY_METHODS": ("POST", "PATCH"),
    "IDEMPOTENCY_TTL": timedelta(hours=24),
    "IDEMPOTENCY_WAIT": timedelta(0),
    "IDEMPOTENCY_LEASE": timedelta(seconds=30),
    "IDEMPOTENCY_STORE": DEFAULT_STORE,
    "IDEMPOTENCY_SCOPE": DEFAULT_SCOPE,
    "IDEMPOTENCY_FINGERPRINT": DEFAULT_FINGERPRINT,
    "IDEMPOTENCY_MAX_RESPONSE_SIZE": 1024 * 1024,
    "IDEMPOTENCY_STORE_SERVER_ERRORS": False,
    "IDEMPOTENCY_STORED_STATUSES": None,
    "IDEMPOTENCY_REPLAY_CACHE": None,
    "IDEMPOTENCY_STORE_CACHE": "default",
    "IDEMPOTENCY_FAIL_OPEN": False,
    "IDEMPOTENCY_SERIALIZER": DEFAULT_SERIALIZER,
    "IDEMPOTENCY_PURGE_BATCH_SIZE": 1000,
    "IDEMPOTENCY_MIDDLEWARE_PATHS": (),
    "IDEMPOTENCY_ENCRYPTION_KEYS": (),
    "IDEMPOTENCY_REDACT": None,
    "IDEMPOTENCY_OUTBOX_PUBLISHERS": {},
    "IDEMPOTENCY_OUTBOX_BATCH_SIZE": 100,
    "IDEMPOTENCY_DATABASE": None,
}

#: Settings that were renamed: old name -> new name. The old name is still read when the new
#: one is not set, and check W010 asks for the new one.
RENAMED: dict[str, str] = {"IDEMPOTENCY_LOCK_TTL": "IDEMPOTENCY_LEASE"}

# How a value is kept once read: a list of methods as an upper-cased set, paths as a tuple,
# stored statuses as a set with lower-cased classes.
_NORMALIZE: dict[str, Callable[[Any], Any]] = {
    "IDEMPOTENCY_METHODS": lambda methods: frozenset(method.upper() for method in methods),
    "IDEMPOTENCY_MIDDLEWARE_PATHS": tuple,
    "IDEMPOTENCY_ENCRYPTION_KEYS": tuple,
    "IDEMPOTENCY_STORED_STATUSES": lambda statuses: (
        None
        if statuses is None
        else frozenset(item.lower() if isinstance(item, str) else item for item in statuses)
    ),
}


def setting_name(name: str) -> str:
    """The name under which the project set ``name``: an old name when only that is set."""
    if not hasattr(settings, name):
        for old, new in RENAMED.items():
            if new == name and hasattr(settings, old):
                return old
    return name


def raw(name: str) -> Any:
    """A setting as the project wrote it (under its old name, if renamed), else its default."""
    return getattr(settings, setting_name(name), DEFAULTS[name])


class Settings:
    """Read ``IDEMPOTENCY_*`` settings at call time, with their defaults from :data:`DEFAULTS`.

    Properties are uncached on purpose, so ``override_settings`` needs no reload logic.
    """

    @staticmethod
    def read(name: str) -> Any:
        """The setting ``name`` as the code uses it (normalised), or its default."""
        value = raw(name)
        normalize = _NORMALIZE.get(name)
        return value if normalize is None else normalize(value)

    @staticmethod
    def default(name: str) -> Any:
        """What :meth:`read` answers for ``name`` when the project sets nothing."""
        value = DEFAULTS[name]
        normalize = _NORMALIZE.get(name)
        return value if normalize is None else normalize(value)

    @property
    def IDEMPOTENCY_HEADER(self) -> str:
        return self.read("IDEMPOTENCY_HEADER")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_REQUIRED(self) -> bool:
        return self.read("IDEMPOTENCY_REQUIRED")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_METHODS(self) -> frozenset[str]:
        return self.read("IDEMPOTENCY_METHODS")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_TTL(self) -> timedelta:
        return self.read("IDEMPOTENCY_TTL")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_WAIT(self) -> timedelta:
        return self.read("IDEMPOTENCY_WAIT")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_LEASE(self) -> timedelta:
        return self.read("IDEMPOTENCY_LEASE")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_LOCK_TTL(self) -> timedelta:
        """The old name of :attr:`IDEMPOTENCY_LEASE`, kept for code that reads it."""
        return self.IDEMPOTENCY_LEASE

    @property
    def IDEMPOTENCY_STORE(self) -> str:
        return self.read("IDEMPOTENCY_STORE")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_SCOPE(self) -> str:
        return self.read("IDEMPOTENCY_SCOPE")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_FINGERPRINT(self) -> str:
        return self.read("IDEMPOTENCY_FINGERPRINT")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_MAX_RESPONSE_SIZE(self) -> int:
        return self.read("IDEMPOTENCY_MAX_RESPONSE_SIZE")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_STORE_SERVER_ERRORS(self) -> bool:
        return self.read("IDEMPOTENCY_STORE_SERVER_ERRORS")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_STORED_STATUSES(self) -> frozenset[str | int] | None:
        return self.read("IDEMPOTENCY_STORED_STATUSES")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_REPLAY_CACHE(self) -> str | None:
        return self.read("IDEMPOTENCY_REPLAY_CACHE")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_STORE_CACHE(self) -> str:
        return self.read("IDEMPOTENCY_STORE_CACHE")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_FAIL_OPEN(self) -> bool:
        return self.read("IDEMPOTENCY_FAIL_OPEN")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_SERIALIZER(self) -> str:
        return self.read("IDEMPOTENCY_SERIALIZER")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_PURGE_BATCH_SIZE(self) -> int:
        return self.read("IDEMPOTENCY_PURGE_BATCH_SIZE")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_MIDDLEWARE_PATHS(self) -> tuple[str, ...]:
        return self.read("IDEMPOTENCY_MIDDLEWARE_PATHS")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_ENCRYPTION_KEYS(self) -> tuple[str | bytes, ...]:
        return self.read("IDEMPOTENCY_ENCRYPTION_KEYS")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_REDACT(self) -> str | None:
        return self.read("IDEMPOTENCY_REDACT")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_OUTBOX_PUBLISHERS(self) -> dict[str, str]:
        return self.read("IDEMPOTENCY_OUTBOX_PUBLISHERS")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_OUTBOX_BATCH_SIZE(self) -> int:
        return self.read("IDEMPOTENCY_OUTBOX_BATCH_SIZE")  # type: ignore[no-any-return]

    @property
    def IDEMPOTENCY_DATABASE(self) -> str | None:
        return self.read("IDEMPOTENCY_DATABASE")  # type: ignore[no-any-return]


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
