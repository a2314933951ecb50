"""System checks for django-idempotency's settings and database.

Ids are stable and never reused; each is described on the docs' checks page. A setting of the
wrong type is reported here, by ``manage.py check`` (and every command that runs checks), and
by :func:`ensure_valid_settings` where no check runs (gunicorn, uvicorn): before the first
covered request is processed.
"""

from __future__ import annotations

import difflib
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import connections
from django.dispatch import receiver
from django.utils.module_loading import import_string

from django_idempotency.conf import (
    DEFAULTS,
    MAX_BATCH_SIZE,
    RENAMED,
    SAFE_METHODS,
    TOKEN,
    InvalidValue,
    conf,
    describe,
    raw,
    setting_name,
    validate_bool,
    validate_duration,
    validate_integer,
    validate_methods,
    validate_statuses,
)
from django_idempotency.encryption import cryptography_installed, validate_keys, validate_redact
from django_idempotency.models import keys_database
from django_idempotency.stores import CacheStore, DatabaseStore

CheckMessages = list[checks.CheckMessage]

logger = logging.getLogger("django_idempotency")
# What core calls on a store (the ``Store`` protocol in ``stores.py``).
_STORE_METHODS = ("get", "claim", "lock", "complete", "release", "renew")
# Cache backends whose entries other processes cannot see.
_PRIVATE_CACHES = frozenset(
    {
        "django.core.cache.backends.locmem.LocMemCache",
        "django.core.cache.backends.dummy.DummyCache",
    }
)


_REDIS_CACHE = "django_redis.cache.RedisCache"


_MIDDLEWARE = "django_idempotency.middleware.IdempotencyMiddleware"
# What must run before IdempotencyMiddleware.process_view: the user its scope is made of, and
# the CSRF check, which a replay returned from process_view would otherwise skip.
_MIDDLEWARE_BEFORE = (
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
)


def register() -> None:
    checks.register(check_settings)
    checks.register(check_unknown_settings)
    checks.register(check_renamed_settings)
    checks.register(check_middleware)
    checks.register(check_store_cache, checks.Tags.caches)
    checks.register(check_replay_cache, checks.Tags.caches)
    checks.register(check_database, checks.Tags.database)


def _error(setting: str, problem: str, id: str, hint: str | None = None) -> checks.Error:
    return checks.Error(f"{setting} {problem}", hint=hint, id=id)


def _invalid(setting: str, exc: InvalidValue, id: str) -> CheckMessages:
    return [_error(setting, exc.problem, id, hint=exc.hint)]


def check_settings(app_configs: Any = None, **kwargs: Any) -> CheckMessages:
    """The type and range of every ``IDEMPOTENCY_*`` setting, and that dotted paths import.

    Each setting is checked as the project wrote it (``conf.raw``): ``conf`` normalises some
    values, and a str of methods would otherwise pass as a set of letters.
    """
    messages: CheckMessages = []
    for name, (check_id, validate) in _VALIDATORS.items():
        written = setting_name(name)  # the old name, if that is the one the project set
        try:
            validate(raw(name), f"{written} = ")
        except InvalidValue as exc:
            messages.append(_error(written, exc.problem, check_id, exc.hint))
    messages += _check_safe_methods()
    messages += _check_stored_statuses()
    messages += _check_encryption_library()
    return messages


def _validate_header(value: object, assign: str) -> None:
    if not (isinstance(value, str) and TOKEN.fullmatch(value)):
        raise InvalidValue(
            f"must be a header name (letters, digits and !#$%&'*+-.^_`|~), not {describe(value)}.",
            hint='The default is "Idempotency-Key".',
        )


def _validate_import(value: object) -> Any:
    """The object that the dotted path ``value`` names."""
    if not isinstance(value, str):
        raise InvalidValue(f"must be a dotted path, not {describe(value)}.")
    try:
        return import_string(value)
    except ImportError as exc:
        raise InvalidValue(f"names {value!r}, which cannot be imported: {exc}") from None


def _validate_class(
    value: object, *, kind: str, methods: tuple[str, ...], attributes: tuple[str, ...], hint: str
) -> None:
    found = _validate_import(value)
    missing = [name for name in methods if not callable(getattr(found, name, None))]
    missing += [name for name in attributes if not hasattr(found, name)]
    if isinstance(found, type) and not missing:
        return
    raise InvalidValue(
        f"names {value!r}, which is not a {kind} class"
        + (f": it has no {', '.join(missing)}." if missing else "."),
        hint=hint,
    )


def _validate_store(value: object, assign: str) -> None:
    _validate_class(
        value,
        kind="store",
        methods=_STORE_METHODS,
        attributes=("supports_atomic",),
        hint="A store implements django_idempotency.stores.Store; see docs/stores.md.",
    )
    store = import_string(str(value))
    if not issubclass(store, DatabaseStore):
        return
    # A DatabaseStore subclass's own choices (docs/stores.md).
    for attribute, allowed in (("statements", ("auto", "orm")), ("claims", ("auto", "rows"))):
        chosen = getattr(store, attribute)
        if chosen not in allowed:
            raise InvalidValue(
                f"names {value!r}, whose {attribute} must be "
                f"{' or '.join(repr(name) for name in allowed)}, not {describe(chosen)}.",
                hint="statements: how the store's SQL is written; claims: how its atomic mode "
                "claims a key. See docs/stores.md.",
            )


def _validate_serializer(value: object, assign: str) -> None:
    _validate_class(
        value,
        kind="serializer",
        methods=("dumps", "loads"),
        attributes=("content_type",),
        hint="A serializer class has content_type, dumps(value) -> bytes and loads(bytes); "
        "see docs/functions.md.",
    )


def _validate_callable(value: object, assign: str) -> None:
    if not callable(_validate_import(value)):
        raise InvalidValue(f"names {value!r}, which is not callable.")


def _validate_paths(value: object, assign: str) -> None:
    hint = 'For example [r"^/api/", r"^/checkout/pay/$"], searched in request.path_info.'
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise InvalidValue(
            f"must be a list or tuple of regular expressions, not {describe(value)}.", hint=hint
        )
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidValue(
                f"holds {pattern!r}, which is not a regular expression: {exc}.", hint=hint
            ) from None


def _duration(*, zero_allowed: bool) -> Callable[[object, str], object]:
    return lambda value, assign: validate_duration(value, assign=assign, zero_allowed=zero_allowed)


def _integer(minimum: int, maximum: int | None = None) -> Callable[[object, str], object]:
    return lambda value, assign: validate_integer(value, minimum=minimum, maximum=maximum)


def _flag(value: object, assign: str) -> object:
    return validate_bool(value)


def _validate_publishers(value: object, assign: str) -> None:
    """A dict of outbox topics (``"*"`` for every other topic) to publishers' dotted paths."""
    hint = 'For example {"orders.created": "django_idempotency.celery.publish_task"}.'
    if not isinstance(value, dict) or not all(
        isinstance(topic, str) and 0 < len(topic) <= 255 for topic in value
    ):
        raise InvalidValue(
            f"must be a dict of outbox topics (1 to 255 characters) to dotted paths of "
            f"publishers, not {describe(value)}.",
            hint=hint,
        )
    for topic, path in value.items():
        try:
            _validate_callable(path, assign)
        except InvalidValue as exc:
            raise InvalidValue(f"[{topic!r}] {exc.problem}", hint=hint) from None


def _validate_database(value: object, assign: str) -> None:
    """``None`` (the router's choice for writing keys) or an alias in ``DATABASES``."""
    if value is None or (isinstance(value, str) and value in connections.settings):
        return
    raise InvalidValue(
        f"must be None or the alias of a database in DATABASES, not {describe(value)}.",
        hint=f"Configured databases: {', '.join(sorted(connections.settings)) or 'none'}.",
    )


#: Each setting's check id and validator (which raises ``InvalidValue``). Ids are stable; the
#: cache settings are checked by check_store_cache and check_replay_cache, with their caches.
_VALIDATORS: dict[str, tuple[str, Callable[[object, str], object]]] = {
    "IDEMPOTENCY_HEADER": ("django_idempotency.E001", _validate_header),
    "IDEMPOTENCY_REQUIRED": ("django_idempotency.E002", _flag),
    "IDEMPOTENCY_METHODS": (
        "django_idempotency.E003",
        lambda value, assign: validate_methods(value),
    ),
    "IDEMPOTENCY_TTL": ("django_idempotency.E004", _duration(zero_allowed=False)),
    "IDEMPOTENCY_WAIT": ("django_idempotency.E005", _duration(zero_allowed=True)),
    "IDEMPOTENCY_LEASE": ("django_idempotency.E006", _duration(zero_allowed=False)),
    "IDEMPOTENCY_STORE": ("django_idempotency.E007", _validate_store),
    "IDEMPOTENCY_SCOPE": ("django_idempotency.E008", _validate_callable),
    "IDEMPOTENCY_FINGERPRINT": ("django_idempotency.E009", _validate_callable),
    "IDEMPOTENCY_MAX_RESPONSE_SIZE": ("django_idempotency.E010", _integer(0)),
    "IDEMPOTENCY_STORE_SERVER_ERRORS": ("django_idempotency.E011", _flag),
    "IDEMPOTENCY_PURGE_BATCH_SIZE": ("django_idempotency.E013", _integer(1)),
    "IDEMPOTENCY_FAIL_OPEN": ("django_idempotency.E017", _flag),
    "IDEMPOTENCY_MIDDLEWARE_PATHS": ("django_idempotency.E018", _validate_paths),
    "IDEMPOTENCY_SERIALIZER": ("django_idempotency.E019", _validate_serializer),
    "IDEMPOTENCY_STORED_STATUSES": (
        "django_idempotency.E020",
        lambda value, assign: validate_statuses(value),
    ),
    "IDEMPOTENCY_ENCRYPTION_KEYS": (
        "django_idempotency.E022",
        lambda value, assign: validate_keys(value),
    ),
    "IDEMPOTENCY_REDACT": ("django_idempotency.E024", lambda value, assign: validate_redact(value)),
    "IDEMPOTENCY_OUTBOX_PUBLISHERS": ("django_idempotency.E030", _validate_publishers),
    "IDEMPOTENCY_OUTBOX_BATCH_SIZE": (
        "django_idempotency.E031",
        _integer(1, MAX_BATCH_SIZE),
    ),
    "IDEMPOTENCY_DATABASE": ("django_idempotency.E025", _validate_database),
}


def _check_stored_statuses() -> CheckMessages:
    """E021: ``IDEMPOTENCY_STORED_STATUSES`` and ``IDEMPOTENCY_STORE_SERVER_ERRORS = True``
    both say whether a 5xx is stored; the list is the whole rule, so the flag is refused
    beside it rather than silently ignored (or silently added to the list)."""
    server_errors = raw("IDEMPOTENCY_STORE_SERVER_ERRORS")
    if raw("IDEMPOTENCY_STORED_STATUSES") is None or server_errors is not True:
        return []
    return [
        _error(
            "IDEMPOTENCY_STORE_SERVER_ERRORS",
            "cannot be True when IDEMPOTENCY_STORED_STATUSES is set: the list alone says "
            "which statuses are stored.",
            "django_idempotency.E021",
            hint='Remove IDEMPOTENCY_STORE_SERVER_ERRORS, and add "5xx" to '
            "IDEMPOTENCY_STORED_STATUSES to store server errors.",
        )
    ]


def _check_encryption_library() -> CheckMessages:
    """E023: keys are set, but the library that uses them is not installed."""
    if not raw("IDEMPOTENCY_ENCRYPTION_KEYS") or cryptography_installed():
        return []
    return [
        _error(
            "IDEMPOTENCY_ENCRYPTION_KEYS",
            "is set, but the cryptography library that encrypts with its keys is not installed.",
            "django_idempotency.E023",
            hint="pip install django-idempotency[encryption]",
        )
    ]


def _check_safe_methods() -> CheckMessages:
    try:
        methods = validate_methods(raw("IDEMPOTENCY_METHODS"))
    except InvalidValue:
        return []  # E003
    safe = sorted(methods & SAFE_METHODS)
    if not safe:
        return []
    return [
        checks.Warning(
            f"IDEMPOTENCY_METHODS lists {', '.join(safe)}: safe methods are never covered, "
            "so listing them has no effect.",
            hint="Remove them from IDEMPOTENCY_METHODS.",
            id="django_idempotency.W002",
        )
    ]


def check_middleware(app_configs: Any = None, **kwargs: Any) -> CheckMessages:
    """``IdempotencyMiddleware`` has paths to cover, and runs after what it depends on."""
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    paths = getattr(settings, "IDEMPOTENCY_MIDDLEWARE_PATHS", ())
    if _MIDDLEWARE not in middleware:
        if not paths:
            return []
        return [
            checks.Warning(
                "IDEMPOTENCY_MIDDLEWARE_PATHS is set, but IdempotencyMiddleware is not in "
                "MIDDLEWARE, so it covers nothing.",
                hint=f"Add {_MIDDLEWARE!r} to MIDDLEWARE, after AuthenticationMiddleware.",
                id="django_idempotency.W008",
            )
        ]
    messages: CheckMessages = []
    if not paths:
        messages.append(
            checks.Warning(
                "IdempotencyMiddleware is in MIDDLEWARE, but IDEMPOTENCY_MIDDLEWARE_PATHS is "
                "empty, so it covers nothing.",
                hint='List the paths to cover, for example [r"^/api/"].',
                id="django_idempotency.W006",
            )
        )
    position = middleware.index(_MIDDLEWARE)
    later = [name for name in _MIDDLEWARE_BEFORE if name in middleware[position:]]
    if later:
        messages.append(
            checks.Warning(
                f"IdempotencyMiddleware comes before {' and '.join(later)} in MIDDLEWARE: "
                "keys would be scoped before the user is known, and replays would skip the "
                "CSRF check.",
                hint="Move IdempotencyMiddleware after them; last in MIDDLEWARE is safest.",
                id="django_idempotency.W007",
            )
        )
    return messages


def _cache_store_alias() -> str | None:
    """The cache alias of the configured store when it is a ``CacheStore``, else ``None``."""
    path = conf.IDEMPOTENCY_STORE
    try:
        store = import_string(path) if isinstance(path, str) else None
    except ImportError:
        return None  # E007 reports it
    if not (isinstance(store, type) and issubclass(store, CacheStore)):
        return None
    alias: object = store.alias or conf.IDEMPOTENCY_STORE_CACHE
    return alias  # type: ignore[return-value]  # checked by check_store_cache


def _import_class(backend: object) -> type | None:
    try:
        found = import_string(backend) if isinstance(backend, str) else None
    except ImportError:
        return None
    return found if isinstance(found, type) else None


def _is_redis_cache(config: dict[str, Any]) -> bool:
    backend = _import_class(config.get("BACKEND"))
    if backend is None:
        return False
    try:
        redis_cache = import_string(_REDIS_CACHE)
    except ImportError:
        return False
    return issubclass(backend, redis_cache)


def _unbounded(alias: str, config: dict[str, Any], setting: str) -> CheckMessages:
    """W005: a Redis cache without socket timeouts makes a hung server hang every request."""
    options = config.get("OPTIONS") or {}
    missing = [
        name for name in ("SOCKET_CONNECT_TIMEOUT", "SOCKET_TIMEOUT") if not options.get(name)
    ]
    if not missing:
        return []
    return [
        checks.Warning(
            f"The cache {alias!r} ({setting}) sets no {' or '.join(missing)}: a Redis server "
            "that stops answering would hold every covered request for redis-py's default "
            "timeout (5 seconds in redis-py 8, none before) instead of answering 503 at once.",
            hint=(
                f"Set CACHES[{alias!r}]['OPTIONS'] = {{'SOCKET_CONNECT_TIMEOUT': 1, "
                "'SOCKET_TIMEOUT': 1} (seconds); see the docs' stores page."
            ),
            id="django_idempotency.W005",
        )
    ]


def _unknown_cache(setting: str, alias: object, id: str) -> CheckMessages:
    optional = "None or " if setting == "IDEMPOTENCY_REPLAY_CACHE" else ""
    return [
        _error(
            setting,
            f"must be {optional}the alias of a cache in CACHES, not {describe(alias)}.",
            id,
            hint=f"Configured caches: {', '.join(sorted(settings.CACHES)) or 'none'}.",
        )
    ]


def check_store_cache(app_configs: Any = None, **kwargs: Any) -> CheckMessages:
    """``CacheStore``'s cache is a configured django-redis cache, with bounded timeouts."""
    alias = _cache_store_alias()
    if alias is None:
        return []
    caches: dict[str, dict[str, Any]] = settings.CACHES
    if not isinstance(alias, str) or alias not in caches:
        return _unknown_cache("IDEMPOTENCY_STORE_CACHE", alias, "django_idempotency.E014")
    config = caches[alias]
    if not _is_redis_cache(config):
        backend = config.get("BACKEND", "")
        if backend in _PRIVATE_CACHES:
            shared = "is not shared between processes, so duplicates in two workers would both run"
        elif _import_class(backend) is None:
            shared = "cannot be imported"
        else:
            shared = "has no atomic compare-and-set"
        return [
            _error(
                "IDEMPOTENCY_STORE_CACHE",
                f"names the cache {alias!r}, whose backend {backend} {shared}: CacheStore "
                "needs a django-redis cache.",
                "django_idempotency.E015",
                hint=f"Use BACKEND = {_REDIS_CACHE!r} (pip install django-redis).",
            )
        ]
    return _unbounded(alias, config, "IDEMPOTENCY_STORE_CACHE")


def check_replay_cache(app_configs: Any = None, **kwargs: Any) -> CheckMessages:
    """``IDEMPOTENCY_REPLAY_CACHE`` names a configured cache that every process shares."""
    alias = conf.IDEMPOTENCY_REPLAY_CACHE
    if alias is None:
        return []
    caches: dict[str, dict[str, Any]] = settings.CACHES
    if not isinstance(alias, str) or alias not in caches:
        return _unknown_cache("IDEMPOTENCY_REPLAY_CACHE", alias, "django_idempotency.E012")
    store_alias = _cache_store_alias()
    if store_alias is not None:
        return [_replay_cache_beside_cache_store(alias, store_alias)]
    config = caches[alias]
    backend = config.get("BACKEND", "")
    if backend not in _PRIVATE_CACHES:
        if _is_redis_cache(config):
            return _unbounded(alias, config, "IDEMPOTENCY_REPLAY_CACHE")
        return []
    return [
        checks.Warning(
            f"IDEMPOTENCY_REPLAY_CACHE names the cache {alias!r}, whose backend {backend} "
            "is not shared between processes: each worker would keep its own copy.",
            hint="Use a shared cache, such as Redis through django-redis.",
            id="django_idempotency.W003",
        )
    ]


def _replay_cache_beside_cache_store(alias: str, store_alias: str) -> checks.CheckMessage:
    if alias == store_alias:
        return _error(
            "IDEMPOTENCY_REPLAY_CACHE",
            f"names the cache {alias!r}, which is the cache store itself "
            "(IDEMPOTENCY_STORE_CACHE): a replay cache must be a second tier in front of the "
            "database store.",
            "django_idempotency.E016",
            hint="Set IDEMPOTENCY_REPLAY_CACHE = None: CacheStore replays from Redis already.",
        )
    return checks.Warning(
        f"IDEMPOTENCY_REPLAY_CACHE names the cache {alias!r}, but the store is CacheStore, "
        "which replays from Redis already: the replay cache is never used.",
        hint="Set IDEMPOTENCY_REPLAY_CACHE = None, or use the database store with it.",
        id="django_idempotency.W004",
    )


def check_database(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> CheckMessages:
    """Warn about a keys database without row locks unless it takes the write lock at BEGIN."""
    messages: CheckMessages = []
    try:
        _validate_database(raw("IDEMPOTENCY_DATABASE"), "")
    except InvalidValue:
        return messages  # E025
    alias = keys_database()
    if databases is None or alias not in databases:
        return messages
    connection = connections[alias]
    transaction_mode = connection.settings_dict.get("OPTIONS", {}).get("transaction_mode")
    if not connection.features.has_select_for_update and transaction_mode != "IMMEDIATE":
        messages.append(
            checks.Warning(
                f"The database '{alias}' that stores idempotency keys ({connection.vendor}) has "
                "no row locks: requests are serialised by its database-wide write lock, and "
                "without OPTIONS['transaction_mode'] = 'IMMEDIATE' concurrent requests for "
                "the same key can fail with 'database is locked' instead of queueing.",
                hint=(
                    "Set DATABASES['" + alias + "']['OPTIONS']['transaction_mode'] = 'IMMEDIATE' "
                    "(Django 5.1+), and prefer PostgreSQL or MariaDB/MySQL in production."
                ),
                id="django_idempotency.W001",
            )
        )
    return messages


def check_unknown_settings(app_configs: Any = None, **kwargs: Any) -> CheckMessages:
    """W009: an ``IDEMPOTENCY_*`` setting that this app does not read (a misspelling)."""
    known = _known_settings()
    messages: CheckMessages = []
    for name in sorted(dir(settings)):
        if not name.startswith("IDEMPOTENCY_") or name in known:
            continue
        # Compared without the prefix, which every name shares and would make any two alike.
        prefix = len("IDEMPOTENCY_")
        suffixes = sorted(known_name[prefix:] for known_name in known)
        wrong = name[prefix:]
        # A known name extended or cut short (IDEMPOTENCY_TTL_SECONDS), else a misspelling.
        matches = sorted(
            (known for known in suffixes if wrong.startswith(known) or known.startswith(wrong)),
            key=len,
            reverse=True,
        ) or difflib.get_close_matches(wrong, suffixes, n=1, cutoff=0.6)
        closest = [f"IDEMPOTENCY_{match}" for match in matches[:1]]
        messages.append(
            checks.Warning(
                f"{name} is not a django-idempotency setting, so it has no effect.",
                hint=f"Did you mean {closest[0]}?" if closest else "See the docs' settings page.",
                id="django_idempotency.W009",
            )
        )
    return messages


def _known_settings() -> frozenset[str]:
    return frozenset(DEFAULTS) | frozenset(RENAMED)


def check_renamed_settings(app_configs: Any = None, **kwargs: Any) -> CheckMessages:
    """W010: a setting set under its old name, which still works."""
    messages: CheckMessages = []
    for old, new in RENAMED.items():
        if not hasattr(settings, old):
            continue
        both = hasattr(settings, new)
        messages.append(
            checks.Warning(
                f"{old} is the old name of {new}"
                + (f", and {new} is set too: {old} is ignored." if both else "; it still works."),
                hint=f"Rename it {new}." if not both else f"Remove {old}.",
                id="django_idempotency.W010",
            )
        )
    return messages


# -- The checks where `manage.py check` never runs --------------------------------------------
#
# gunicorn and uvicorn import the project without running system checks, so a setting of the
# wrong type would surface as a database error in the middle of a request (a TTL of 3600
# cannot be added to a date). The first covered request (and IdempotencyMiddleware when the
# server loads it) runs the settings' checks: errors stop it with the checks' own messages;
# warnings are logged once.

_validated = threading.Event()


def ensure_valid_settings() -> None:
    """Raise ``ImproperlyConfigured`` with the checks' messages if a setting is wrong.

    Cheap after the first success (a flag, reset when a setting changes, as under
    ``override_settings``). Warnings (a misspelled setting name) are logged once.
    """
    if _validated.is_set():
        return
    silenced = set(getattr(settings, "SILENCED_SYSTEM_CHECKS", ()))
    messages = [
        message
        for message in (
            *check_settings(),
            *check_unknown_settings(),
            *check_renamed_settings(),
            *check_store_cache(),
            *check_replay_cache(),
        )
        if message.id not in silenced  # as `manage.py check` does
    ]
    errors = [message for message in messages if message.is_serious()]
    if errors:
        raise ImproperlyConfigured(
            "django-idempotency is misconfigured (manage.py check reports the same):\n"
            + "\n".join(_format(message) for message in errors)
        )
    for message in messages:
        logger.warning("%s", _format(message))
    _validated.set()


def _format(message: checks.CheckMessage) -> str:
    hint = f" HINT: {message.hint}" if message.hint else ""
    return f"({message.id}) {message.msg}{hint}"


@receiver(setting_changed)
def _revalidate(*, setting: str, **kwargs: Any) -> None:
    if setting.startswith("IDEMPOTENCY_") or setting in (
        "CACHES",
        "DATABASES",
        "SILENCED_SYSTEM_CHECKS",
    ):
        _validated.clear()


# -- The cache store's durability guard (docs/stores.md, "Failover") ---------------------------

_DURABILITY_IDS = {
    "IDEMPOTENCY_WAIT_REPLICAS": "django_idempotency.E032",
    "IDEMPOTENCY_WAIT_TIMEOUT": "django_idempotency.E033",
}


@checks.register(checks.Tags.caches)
def check_store_cache_durability(app_configs: Any = None, **kwargs: Any) -> CheckMessages:
    """E032, E033: the cache store's ``WAIT`` options, in its cache's ``OPTIONS``."""
    alias = _cache_store_alias()
    config = settings.CACHES.get(alias) if isinstance(alias, str) else None
    if not isinstance(config, dict):
        return []  # E014 reports it
    problems = CacheStore.durability_problems(config.get("OPTIONS") or {})
    return [
        checks.Error(
            f"CACHES[{alias!r}]['OPTIONS'][{name!r}] {problem}",
            hint=(
                "The number of Redis replicas that must acknowledge each claim and each stored "
                "response (0: none, the default), and how long to wait for them, in seconds."
            ),
            id=_DURABILITY_IDS[name],
        )
        for name, problem in problems.items()
    ]
