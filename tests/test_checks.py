"""System checks: every setting's check, and the database warning ``django_idempotency.W001``.

W001 warns about a database without row locks (SQLite) whose transactions do not take the
write lock at ``BEGIN`` (``OPTIONS["transaction_mode"] = "IMMEDIATE"``). The test settings set
that mode, so the tests that expect the warning take it away first.
"""

from __future__ import annotations

import re
import sys
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.checks import Error as CheckError
from django.core.checks import Warning as CheckWarning
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test import Client, override_settings

from django_idempotency import checks as checks_module
from django_idempotency.checks import (
    check_database,
    check_replay_cache,
    check_settings,
    check_store_cache,
)
from django_idempotency.conf import conf
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import CacheStore, DatabaseStore
from tests.models import Charge

pytestmark = pytest.mark.django_db

ON_SQLITE = connection.vendor == "sqlite"
W001 = "django_idempotency.W001"


@pytest.fixture
def deferred_transactions(monkeypatch):
    """Run the check as if the database had the default ``transaction_mode``."""
    options = {**connection.settings_dict.get("OPTIONS", {})}
    options.pop("transaction_mode", None)
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)


@pytest.mark.usefixtures("deferred_transactions")
def test_w001_appears_on_sqlite_and_not_on_databases_with_row_locks():
    ids = [message.id for message in check_database(databases=["default"])]

    assert ids == ([W001] if ON_SQLITE else [])


@pytest.mark.skipif(not ON_SQLITE, reason="W001 is about SQLite")
@pytest.mark.usefixtures("deferred_transactions")
def test_w001_explains_the_trade_off_and_the_transaction_mode_setting():
    [message] = check_database(databases=["default"])

    assert isinstance(message, CheckWarning)
    assert "no row locks" in message.msg
    assert "'default'" in message.msg
    assert "transaction_mode" in message.hint
    assert "IMMEDIATE" in message.hint


def test_immediate_transaction_mode_silences_w001():
    assert connection.settings_dict["OPTIONS"].get("transaction_mode") == (
        "IMMEDIATE" if ON_SQLITE else None
    )

    assert check_database(databases=["default"]) == []


@pytest.mark.usefixtures("deferred_transactions")
def test_database_check_is_silent_when_the_keys_database_is_not_checked():
    assert check_database(databases=None) == []
    assert check_database(databases=["other"]) == []


@pytest.mark.usefixtures("deferred_transactions")
def test_check_command_reports_w001_only_when_databases_are_checked():
    with_databases, without = StringIO(), StringIO()

    call_command("check", databases=["default"], stdout=with_databases, stderr=with_databases)
    call_command("check", stdout=without, stderr=without)

    assert (W001 in with_databases.getvalue()) is ON_SQLITE
    assert W001 not in without.getvalue()


@pytest.mark.usefixtures("deferred_transactions")
def test_check_command_fails_at_warning_level_on_sqlite_only():
    def check():
        call_command("check", databases=["default"], fail_level="WARNING", stdout=StringIO())

    if ON_SQLITE:
        with pytest.raises(SystemCheckError, match=W001):
            check()
    else:
        check()


# -- The settings -------------------------------------------------------------------------------


class NotAStore:
    """Importable, but without the methods core calls on a store."""

    def get(self, **kwargs):  # pragma: no cover - never called
        return None


NOT_CALLABLE = "django_idempotency.conf.DEFAULT_STORE"  # a string constant


class SqlStore(DatabaseStore):
    statements = "sql"  # type: ignore[assignment]


class AdvisoryStore(DatabaseStore):
    claims = "advisory"  # type: ignore[assignment]


# (setting, a bad value, the id it gets, words the message has)
BAD_SETTINGS = [
    ("IDEMPOTENCY_HEADER", "", "E001", "must be a header name"),
    ("IDEMPOTENCY_HEADER", "Idempotency Key", "E001", "'Idempotency Key' (str)"),
    ("IDEMPOTENCY_HEADER", 5, "E001", "not 5 (int)"),
    ("IDEMPOTENCY_HEADER", "Idempotency-Key\n", "E001", "'Idempotency-Key\\n' (str)"),
    ("IDEMPOTENCY_REQUIRED", "yes", "E002", "must be True or False, not 'yes' (str)"),
    (
        "IDEMPOTENCY_DATABASE",
        "replcia",
        "E025",
        "must be None or the alias of a database in DATABASES, not 'replcia' (str)",
    ),
    ("IDEMPOTENCY_DATABASE", 5, "E025", "not 5 (int)"),
    ("IDEMPOTENCY_METHODS", "POST", "E003", "must be a list or tuple of HTTP method names"),
    ("IDEMPOTENCY_METHODS", ["POST", 1], "E003", "not ['POST', 1] (list)"),
    ("IDEMPOTENCY_METHODS", ["PO ST"], "E003", "HTTP method names"),
    ("IDEMPOTENCY_METHODS", ["POST\n"], "E003", "HTTP method names"),
    ("IDEMPOTENCY_METHODS", None, "E003", "not None (NoneType)"),
    ("IDEMPOTENCY_TTL", 3600, "E004", "must be a positive timedelta, not 3600 (int)"),
    ("IDEMPOTENCY_TTL", timedelta(0), "E004", "must be a positive timedelta"),
    ("IDEMPOTENCY_TTL", timedelta(seconds=-1), "E004", "must be a positive timedelta"),
    ("IDEMPOTENCY_TTL", timedelta(days=36501), "E004", "must be a timedelta of at most 36500"),
    ("IDEMPOTENCY_LEASE", timedelta.max, "E006", "must be a timedelta of at most 36500 days"),
    ("IDEMPOTENCY_WAIT", 5, "E005", "must be a datetime.timedelta of zero or more, not 5"),
    ("IDEMPOTENCY_WAIT", timedelta(seconds=-1), "E005", "of zero or more"),
    ("IDEMPOTENCY_LEASE", timedelta(0), "E006", "must be a positive timedelta"),
    ("IDEMPOTENCY_LEASE", 30, "E006", "not 30 (int)"),
    (
        "IDEMPOTENCY_STORE",
        "no.such.Store",
        "E007",
        "names 'no.such.Store', which cannot be imported",
    ),
    ("IDEMPOTENCY_STORE", 5, "E007", "must be a dotted path, not 5 (int)"),
    (
        "IDEMPOTENCY_STORE",
        "tests.test_checks.NotAStore",
        "E007",
        "which is not a store class: it has no claim, lock, complete, release, renew, "
        "supports_atomic.",
    ),
    ("IDEMPOTENCY_STORE", NOT_CALLABLE, "E007", "which is not a store class"),
    (
        "IDEMPOTENCY_STORE",
        "tests.test_checks.SqlStore",
        "E007",
        "whose statements must be 'auto' or 'orm', not 'sql' (str).",
    ),
    (
        "IDEMPOTENCY_STORE",
        "tests.test_checks.AdvisoryStore",
        "E007",
        "whose claims must be 'auto' or 'rows', not 'advisory' (str).",
    ),
    ("IDEMPOTENCY_SCOPE", "tests.views.no_such_function", "E008", "cannot be imported"),
    ("IDEMPOTENCY_SCOPE", NOT_CALLABLE, "E008", "which is not callable"),
    ("IDEMPOTENCY_FINGERPRINT", "nope", "E009", "names 'nope', which cannot be imported"),
    ("IDEMPOTENCY_FINGERPRINT", NOT_CALLABLE, "E009", "which is not callable"),
    ("IDEMPOTENCY_MAX_RESPONSE_SIZE", -1, "E010", "must be an integer of 0 or more, not -1"),
    ("IDEMPOTENCY_MAX_RESPONSE_SIZE", "1MB", "E010", "not '1MB' (str)"),
    ("IDEMPOTENCY_MAX_RESPONSE_SIZE", True, "E010", "not True (bool)"),
    ("IDEMPOTENCY_STORE_SERVER_ERRORS", 1, "E011", "must be True or False, not 1 (int)"),
    ("IDEMPOTENCY_FAIL_OPEN", "no", "E017", "must be True or False, not 'no' (str)"),
    ("IDEMPOTENCY_PURGE_BATCH_SIZE", 0, "E013", "must be a positive integer, not 0 (int)"),
    ("IDEMPOTENCY_PURGE_BATCH_SIZE", 1.5, "E013", "not 1.5 (float)"),
    ("IDEMPOTENCY_MIDDLEWARE_PATHS", "^/api/", "E018", "not '^/api/' (str)"),
    ("IDEMPOTENCY_MIDDLEWARE_PATHS", ["("], "E018", "which is not a regular expression"),
    ("IDEMPOTENCY_SERIALIZER", "no.such.Serializer", "E019", "which cannot be imported"),
    ("IDEMPOTENCY_SERIALIZER", 3, "E019", "must be a dotted path, not 3 (int)"),
    (
        "IDEMPOTENCY_SERIALIZER",
        "tests.test_checks.NotAStore",
        "E019",
        "which is not a serializer class: it has no dumps, loads, content_type.",
    ),
    (
        "IDEMPOTENCY_SERIALIZER",
        "json.dumps",
        "E019",
        "which is not a serializer class: it has no dumps, loads, content_type.",
    ),
    (
        "IDEMPOTENCY_STORED_STATUSES",
        "2xx",
        "E020",
        'must be None, or a list or tuple of status classes ("2xx", "4xx") and status '
        "codes (200 to 599), not '2xx' (str).",
    ),
    ("IDEMPOTENCY_STORED_STATUSES", ["2xx", "6xx"], "E020", "not ['2xx', '6xx'] (list)"),
    ("IDEMPOTENCY_STORED_STATUSES", (200, 700), "E020", "not (200, 700) (tuple)"),
    ("IDEMPOTENCY_STORED_STATUSES", [False], "E020", "not [False] (list)"),
    ("IDEMPOTENCY_STORED_STATUSES", [], "E020", "must name at least one status class or code"),
]


def _messages(settings_module, name, value):
    setattr(settings_module, name, value)
    return check_settings() + check_store_cache() + check_replay_cache()


def test_the_defaults_pass_every_check():
    assert check_settings() == []
    assert check_store_cache() == []
    assert check_replay_cache() == []


@pytest.mark.parametrize(("setting", "value", "check_id", "words"), BAD_SETTINGS)
def test_a_bad_setting_is_an_error_naming_it(settings, setting, value, check_id, words):
    [message] = _messages(settings, setting, value)

    assert message.id == f"django_idempotency.{check_id}"
    assert isinstance(message, CheckError)
    assert message.msg.startswith(f"{setting} ")
    assert words in message.msg


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("IDEMPOTENCY_HEADER", "X-Request-Key"),
        ("IDEMPOTENCY_METHODS", ("post", "PUT", "DELETE")),
        ("IDEMPOTENCY_METHODS", frozenset({"PATCH"})),
        ("IDEMPOTENCY_METHODS", []),
        ("IDEMPOTENCY_WAIT", timedelta(0)),
        ("IDEMPOTENCY_STORE", "tests.views.OfflineStore"),
        ("IDEMPOTENCY_SCOPE", "tests.views.tenant_scope"),
        ("IDEMPOTENCY_MAX_RESPONSE_SIZE", 0),
        ("IDEMPOTENCY_PURGE_BATCH_SIZE", 1),
        ("IDEMPOTENCY_REPLAY_CACHE", None),
        ("IDEMPOTENCY_DATABASE", None),
        ("IDEMPOTENCY_DATABASE", "default"),
        ("IDEMPOTENCY_SERIALIZER", "tests.test_functions.ReprSerializer"),
        ("IDEMPOTENCY_STORED_STATUSES", ("2xx", 404, 410)),
        ("IDEMPOTENCY_STORED_STATUSES", frozenset({"4XX", 201})),
        ("IDEMPOTENCY_STORED_STATUSES", None),
    ],
)
def test_good_values_pass(settings, setting, value):
    assert _messages(settings, setting, value) == []


def test_w002_safe_methods_are_never_covered(settings):
    [message] = _messages(settings, "IDEMPOTENCY_METHODS", ["POST", "get", "HEAD"])

    assert message.id == "django_idempotency.W002"
    assert isinstance(message, CheckWarning)
    assert message.msg.startswith("IDEMPOTENCY_METHODS lists GET, HEAD: safe methods are never")


def test_e021_stored_statuses_and_store_server_errors_are_not_set_together(settings):
    settings.IDEMPOTENCY_STORE_SERVER_ERRORS = True
    [message] = _messages(settings, "IDEMPOTENCY_STORED_STATUSES", ("2xx",))

    assert message.id == "django_idempotency.E021"
    assert isinstance(message, CheckError)
    assert message.msg == (
        "IDEMPOTENCY_STORE_SERVER_ERRORS cannot be True when IDEMPOTENCY_STORED_STATUSES is "
        "set: the list alone says which statuses are stored."
    )
    assert '"5xx"' in message.hint
    # False beside the list says nothing the list does not: no error.
    assert _messages(settings, "IDEMPOTENCY_STORE_SERVER_ERRORS", False) == []


def test_e021_stops_the_first_covered_request(settings):
    settings.IDEMPOTENCY_STORE_SERVER_ERRORS = True
    settings.IDEMPOTENCY_STORED_STATUSES = ("2xx", "5xx")

    with pytest.raises(ImproperlyConfigured, match=r"django_idempotency\.E021"):
        Client().post("/sync/", {}, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k")


def test_e012_the_replay_cache_must_be_a_configured_cache(settings):
    [message] = _messages(settings, "IDEMPOTENCY_REPLAY_CACHE", "replay")

    assert message.id == "django_idempotency.E012"
    assert message.msg == (
        "IDEMPOTENCY_REPLAY_CACHE must be None or the alias of a cache in CACHES, "
        "not 'replay' (str)."
    )
    assert message.hint.startswith("Configured caches: default")


def test_e012_the_replay_cache_must_be_an_alias(settings):
    [message] = _messages(settings, "IDEMPOTENCY_REPLAY_CACHE", 3)

    assert message.id == "django_idempotency.E012"


def test_w003_the_replay_cache_must_be_shared(settings):
    settings.CACHES = {
        **settings.CACHES,
        "dummy": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"},
        "files": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache"},
    }

    [local] = _messages(settings, "IDEMPOTENCY_REPLAY_CACHE", "default")
    [dummy] = _messages(settings, "IDEMPOTENCY_REPLAY_CACHE", "dummy")

    assert local.id == dummy.id == "django_idempotency.W003"
    assert "LocMemCache is not shared between processes" in local.msg
    assert _messages(settings, "IDEMPOTENCY_REPLAY_CACHE", "files") == []


def test_each_check_id_names_one_setting_and_each_setting_has_one_error_id(settings):
    seen: dict[str, set[str]] = {}
    for setting, value, _check_id, _ in BAD_SETTINGS:
        with override_settings(**{setting: value}):
            for message in check_settings():
                seen.setdefault(message.id, set()).add(message.msg.split()[0])
    settings.IDEMPOTENCY_REPLAY_CACHE = "missing"
    for message in check_replay_cache():
        seen.setdefault(message.id, set()).add(message.msg.split()[0])

    assert all(len(names) == 1 for names in seen.values()), seen
    names = [next(iter(names)) for names in seen.values()]
    assert len(names) == len(set(names)), seen


def test_every_check_id_in_the_source_is_tested():
    source = Path(checks_module.__file__).read_text(encoding="utf-8")
    in_source = set(re.findall(r"django_idempotency\.([EW]\d{3})", source))
    tested = (
        {check_id for _, _, check_id, _ in BAD_SETTINGS}
        | {"E012", "E021", "W001", "W002", "W003", "W009", "W010"}
        | {"W006", "W007", "W008"}  # tests/test_middleware.py
        | {"E022", "E023", "E024"}  # tests/test_encryption.py
        | {"E030", "E031"}  # tests/test_outbox.py
        | {"E032", "E033"}  # tests/test_redis_ha_checks.py
        | {
            "E014",
            "E015",
            "E016",
            "W004",
            "W005",
        }
    )

    assert in_source == tested


def test_check_command_fails_on_a_bad_setting(settings):
    settings.IDEMPOTENCY_TTL = 3600

    with pytest.raises(SystemCheckError, match=r"django_idempotency\.E004"):
        call_command("check", stdout=StringIO(), stderr=StringIO())


def test_check_command_passes_with_the_defaults():
    out = StringIO()

    call_command("check", stdout=out)

    assert "no issues" in out.getvalue()


def test_the_replay_cache_check_runs_with_the_caches_tag(settings):
    settings.IDEMPOTENCY_REPLAY_CACHE = "missing"

    with pytest.raises(SystemCheckError, match=r"django_idempotency\.E012"):
        call_command("check", tags=["caches"], stdout=StringIO(), stderr=StringIO())


# -- The cache store and the replay cache ----------------------------------------------------

CACHE_STORE = "django_idempotency.stores.CacheStore"
REDIS_BACKEND = "django_redis.cache.RedisCache"
BOUNDED = {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1}


@pytest.fixture
def caches_for_checks(settings):
    """Caches of every kind the checks tell apart (never connected to: checks only read)."""
    pytest.importorskip("django_redis", reason="django-redis is not installed (tox minimal)")
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "dummy": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"},
        "files": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": "/nonexistent/django-idempotency-checks",
        },
        "redis": {
            "BACKEND": REDIS_BACKEND,
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": BOUNDED,
        },
        "redis-too": {
            "BACKEND": REDIS_BACKEND,
            "LOCATION": "redis://127.0.0.1:1/1",
            "OPTIONS": BOUNDED,
        },
        "unbounded": {"BACKEND": REDIS_BACKEND, "LOCATION": "redis://127.0.0.1:1/2"},
    }
    settings.IDEMPOTENCY_STORE = CACHE_STORE
    return settings


def _cache_messages():
    return check_store_cache() + check_replay_cache()


def test_cache_store_on_a_bounded_django_redis_cache_passes(caches_for_checks):
    caches_for_checks.IDEMPOTENCY_STORE_CACHE = "redis"

    assert _cache_messages() == []


def test_e014_the_cache_store_needs_a_configured_cache(caches_for_checks):
    caches_for_checks.IDEMPOTENCY_STORE_CACHE = "idempotency"

    [message] = _cache_messages()

    assert message.id == "django_idempotency.E014"
    assert isinstance(message, CheckError)
    assert message.msg == (
        "IDEMPOTENCY_STORE_CACHE must be the alias of a cache in CACHES, not 'idempotency' (str)."
    )
    assert "redis" in message.hint


@pytest.mark.parametrize(
    ("alias", "words"),
    [
        ("default", "LocMemCache is not shared between processes"),
        ("dummy", "DummyCache is not shared between processes"),
        ("files", "FileBasedCache has no atomic compare-and-set"),
    ],
)
def test_e015_the_cache_store_needs_django_redis(caches_for_checks, alias, words):
    caches_for_checks.IDEMPOTENCY_STORE_CACHE = alias

    [message] = _cache_messages()

    assert message.id == "django_idempotency.E015"
    assert words in message.msg
    assert REDIS_BACKEND in message.hint


def test_the_store_cache_is_not_checked_for_the_database_store(caches_for_checks):
    caches_for_checks.IDEMPOTENCY_STORE = "django_idempotency.stores.DatabaseStore"
    caches_for_checks.IDEMPOTENCY_STORE_CACHE = "dummy"

    assert _cache_messages() == []


def test_a_subclass_pinning_its_alias_is_checked_on_that_alias(caches_for_checks):
    caches_for_checks.IDEMPOTENCY_STORE = "tests.test_checks.PinnedCacheStore"
    caches_for_checks.IDEMPOTENCY_STORE_CACHE = "redis"  # not the one the subclass uses

    [message] = _cache_messages()

    assert message.id == "django_idempotency.E015"
    assert "'dummy'" in message.msg


def test_e016_the_replay_cache_is_not_the_cache_store_itself(caches_for_checks):
    caches_for_checks.IDEMPOTENCY_STORE_CACHE = "redis"
    caches_for_checks.IDEMPOTENCY_REPLAY_CACHE = "redis"

    [message] = _cache_messages()

    assert message.id == "django_idempotency.E016"
    assert isinstance(message, CheckError)
    assert "is the cache store itself" in message.msg


def test_w004_a_replay_cache_beside_the_cache_store_is_never_used(caches_for_checks):
    caches_for_checks.IDEMPOTENCY_STORE_CACHE = "redis"
    caches_for_checks.IDEMPOTENCY_REPLAY_CACHE = "redis-too"

    [message] = _cache_messages()

    assert message.id == "django_idempotency.W004"
    assert isinstance(message, CheckWarning)
    assert "never used" in message.msg


@pytest.mark.parametrize("setting", ["IDEMPOTENCY_STORE_CACHE", "IDEMPOTENCY_REPLAY_CACHE"])
def test_w005_a_redis_cache_without_socket_timeouts(caches_for_checks, setting):
    if setting == "IDEMPOTENCY_REPLAY_CACHE":
        caches_for_checks.IDEMPOTENCY_STORE = "django_idempotency.stores.DatabaseStore"
    else:
        caches_for_checks.IDEMPOTENCY_STORE_CACHE = "redis"
    setattr(caches_for_checks, setting, "unbounded")

    [message] = _cache_messages()

    assert message.id == "django_idempotency.W005"
    assert isinstance(message, CheckWarning)
    assert "'unbounded'" in message.msg
    assert f"({setting})" in message.msg
    assert "SOCKET_CONNECT_TIMEOUT or SOCKET_TIMEOUT" in message.msg
    assert "SOCKET_TIMEOUT" in message.hint
    # A dict literal the user can paste: its braces balance (no stray "}" as before).
    assert "= {'SOCKET_CONNECT_TIMEOUT': 1, 'SOCKET_TIMEOUT': 1} (seconds)" in message.hint


def test_the_store_cache_check_runs_with_the_caches_tag(caches_for_checks):
    caches_for_checks.IDEMPOTENCY_STORE_CACHE = "missing"

    with pytest.raises(SystemCheckError, match=r"django_idempotency\.E014"):
        call_command("check", tags=["caches"], stdout=StringIO(), stderr=StringIO())


class PinnedCacheStore(CacheStore):
    alias = "dummy"


def test_e015_without_django_redis_installed(settings, monkeypatch):
    """What a project gets when it names the cache store but django-redis is not installed."""
    settings.CACHES = {
        **settings.CACHES,
        "redis": {"BACKEND": REDIS_BACKEND, "LOCATION": "redis://127.0.0.1:1/0"},
    }
    settings.IDEMPOTENCY_STORE = CACHE_STORE
    settings.IDEMPOTENCY_STORE_CACHE = "redis"
    for module in ("django_redis", "django_redis.cache"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed

    [message] = check_store_cache()

    assert message.id == "django_idempotency.E015"
    assert f"{REDIS_BACKEND} cannot be imported" in message.msg
    assert "pip install django-redis" in message.hint


# -- W009: a setting this app does not read ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("IDEMPOTENCY_XYZZY", None),
        ("IDEMPOTENCY_TTL_SECONDS", "IDEMPOTENCY_TTL"),
        ("IDEMPOTENCY_REQUIERED", "IDEMPOTENCY_REQUIRED"),
        ("IDEMPOTENCY_METHOD", "IDEMPOTENCY_METHODS"),
    ],
)
def test_w009_an_unknown_setting_is_named_with_the_closest_valid_name(settings, name, closest):
    setattr(settings, name, True)

    [message] = checks_module.check_unknown_settings()

    assert message.id == "django_idempotency.W009"
    assert isinstance(message, CheckWarning)
    assert message.msg == f"{name} is not a django-idempotency setting, so it has no effect."
    if closest is None:
        assert message.hint == "See the docs' settings page."
    else:
        assert message.hint == f"Did you mean {closest}?"


def test_w009_is_silent_for_every_known_setting(settings):
    for name in checks_module._known_settings():
        setattr(settings, name, getattr(conf, name))

    assert checks_module.check_unknown_settings() == []


# -- Where `manage.py check` never runs: the first covered request -----------------------------


def _keyed_post(path="/sync/", key="k"):
    client = Client(raise_request_exception=True)
    return client.post(
        path, {"amount": 1}, content_type="application/json", headers={"Idempotency-Key": key}
    )


@pytest.mark.parametrize(
    ("setting", "value", "check_id"),
    [
        ("IDEMPOTENCY_TTL", 3600, "E004"),
        ("IDEMPOTENCY_METHODS", "POST", "E003"),
        ("IDEMPOTENCY_WAIT", 2, "E005"),
        ("IDEMPOTENCY_STORE", "no.such.Store", "E007"),
    ],
)
def test_a_bad_setting_stops_the_first_covered_request_with_the_checks_message(
    settings, setting, value, check_id
):
    # As under gunicorn or uvicorn, which run no system checks: the request fails before any
    # store call, with the message `manage.py check` would print, not a database error.
    setattr(settings, setting, value)
    [expected] = [m for m in check_settings() if m.id == f"django_idempotency.{check_id}"]

    with pytest.raises(ImproperlyConfigured) as caught:
        _keyed_post()

    assert f"(django_idempotency.{check_id}) {expected.msg}" in str(caught.value)
    assert not IdempotencyKey.objects.exists()
    assert not Charge.objects.exists()


def test_a_bad_setting_also_stops_an_idempotent_function(settings):
    from django_idempotency.functions import idempotent_call

    settings.IDEMPOTENCY_LOCK_TTL = 30

    with (
        pytest.raises(ImproperlyConfigured, match=r"django_idempotency\.E006"),
        idempotent_call("k", scope="billing"),
    ):
        raise AssertionError("the block must not run")


def test_settings_are_checked_again_after_they_change(settings):
    assert _keyed_post().status_code == 201
    settings.IDEMPOTENCY_TTL = 3600

    with pytest.raises(ImproperlyConfigured, match="E004"):
        _keyed_post("/sync/again/")


def test_an_unknown_setting_is_logged_once_at_the_first_covered_request(settings, caplog):
    settings.IDEMPOTENCY_REQUIERED = True

    with caplog.at_level("WARNING", logger="django_idempotency"):
        assert _keyed_post().status_code == 201
        assert _keyed_post(key="another").status_code == 201

    logged = [r.getMessage() for r in caplog.records if "W009" in r.getMessage()]
    assert logged == [
        "(django_idempotency.W009) IDEMPOTENCY_REQUIERED is not a django-idempotency setting, "
        "so it has no effect. HINT: Did you mean IDEMPOTENCY_REQUIRED?"
    ]


def test_a_silenced_check_is_silent_at_the_first_covered_request_too(settings, caplog):
    settings.IDEMPOTENCY_REQUIERED = True
    settings.SILENCED_SYSTEM_CHECKS = ["django_idempotency.W009"]

    with caplog.at_level("WARNING", logger="django_idempotency"):
        assert _keyed_post().status_code == 201

    assert not [r for r in caplog.records if "W009" in r.getMessage()]


# -- W010: a setting under its old name ------------------------------------------------------


def test_w010_the_old_name_of_a_renamed_setting_still_works_and_is_reported(settings):
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(seconds=10)

    [message] = checks_module.check_renamed_settings()

    assert message.id == "django_idempotency.W010"
    assert isinstance(message, CheckWarning)
    assert message.msg == (
        "IDEMPOTENCY_LOCK_TTL is the old name of IDEMPOTENCY_LEASE; it still works."
    )
    assert message.hint == "Rename it IDEMPOTENCY_LEASE."
    assert timedelta(seconds=10) == conf.IDEMPOTENCY_LEASE


def test_w010_says_which_wins_when_both_names_are_set(settings):
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(seconds=10)
    settings.IDEMPOTENCY_LEASE = timedelta(seconds=20)

    [message] = checks_module.check_renamed_settings()

    assert "IDEMPOTENCY_LOCK_TTL is ignored" in message.msg
    assert timedelta(seconds=20) == conf.IDEMPOTENCY_LEASE


def test_a_wrong_value_under_the_old_name_is_reported_under_that_name(settings):
    settings.IDEMPOTENCY_LOCK_TTL = 30

    [message] = [m for m in check_settings() if m.id == "django_idempotency.E006"]

    assert message.msg.startswith("IDEMPOTENCY_LOCK_TTL must be a positive timedelta")
    assert "IDEMPOTENCY_LOCK_TTL = timedelta(seconds=30)" in message.hint


def test_w010_is_silent_without_the_old_name():
    assert checks_module.check_renamed_settings() == []
