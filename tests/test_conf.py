"""``conf``: every ``IDEMPOTENCY_*`` setting's default and override, and the cached hooks."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings

from django_idempotency.conf import (
    DEFAULTS,
    conf,
    get_fingerprint_function,
    get_scope_function,
    get_store,
)
from django_idempotency.core import request_fingerprint, user_scope
from django_idempotency.stores import DatabaseStore
from tests.views import OfflineStore, method_and_path_fingerprint, tenant_scope

SETTINGS = [
    # (name, default, an override, what conf returns for the override)
    ("IDEMPOTENCY_HEADER", "Idempotency-Key", "X-Request-Key", "X-Request-Key"),
    ("IDEMPOTENCY_REQUIRED", False, True, True),
    ("IDEMPOTENCY_METHODS", frozenset({"POST", "PATCH"}), ["put", "Post"], {"PUT", "POST"}),
    ("IDEMPOTENCY_TTL", timedelta(hours=24), timedelta(days=7), timedelta(days=7)),
    ("IDEMPOTENCY_WAIT", timedelta(0), timedelta(seconds=5), timedelta(seconds=5)),
    ("IDEMPOTENCY_LEASE", timedelta(seconds=30), timedelta(minutes=2), timedelta(minutes=2)),
    # The old name of IDEMPOTENCY_LEASE: conf still answers it, and reads it when set.
    ("IDEMPOTENCY_LOCK_TTL", timedelta(seconds=30), timedelta(minutes=2), timedelta(minutes=2)),
    (
        "IDEMPOTENCY_STORE",
        "django_idempotency.stores.DatabaseStore",
        "tests.views.OfflineStore",
        "tests.views.OfflineStore",
    ),
    (
        "IDEMPOTENCY_SCOPE",
        "django_idempotency.core.user_scope",
        "tests.views.tenant_scope",
        "tests.views.tenant_scope",
    ),
    (
        "IDEMPOTENCY_FINGERPRINT",
        "django_idempotency.core.request_fingerprint",
        "tests.views.method_and_path_fingerprint",
        "tests.views.method_and_path_fingerprint",
    ),
    ("IDEMPOTENCY_MAX_RESPONSE_SIZE", 1024 * 1024, 10_000, 10_000),
    ("IDEMPOTENCY_STORE_SERVER_ERRORS", False, True, True),
    ("IDEMPOTENCY_STORED_STATUSES", None, ["2XX", 409], frozenset({"2xx", 409})),
    ("IDEMPOTENCY_REPLAY_CACHE", None, "default", "default"),
    ("IDEMPOTENCY_DATABASE", None, "default", "default"),
    ("IDEMPOTENCY_PURGE_BATCH_SIZE", 1000, 250, 250),
    ("IDEMPOTENCY_STORE_CACHE", "default", "idempotency", "idempotency"),
    ("IDEMPOTENCY_FAIL_OPEN", False, True, True),
    ("IDEMPOTENCY_MIDDLEWARE_PATHS", (), [r"^/api/"], (r"^/api/",)),
    ("IDEMPOTENCY_ENCRYPTION_KEYS", (), ["a" * 43 + "="], ("a" * 43 + "=",)),
    ("IDEMPOTENCY_REDACT", None, "tests.test_encryption.redact", "tests.test_encryption.redact"),
    (
        "IDEMPOTENCY_OUTBOX_PUBLISHERS",
        {},
        {"*": "tests.outbox_publishers.record"},
        {"*": "tests.outbox_publishers.record"},
    ),
    ("IDEMPOTENCY_OUTBOX_BATCH_SIZE", 100, 20, 20),
    (
        "IDEMPOTENCY_SERIALIZER",
        "django_idempotency.functions.JSONSerializer",
        "tests.test_functions.ReprSerializer",
        "tests.test_functions.ReprSerializer",
    ),
]


def test_every_setting_of_conf_is_tested_here():
    names = {name for name in dir(type(conf)) if name.startswith("IDEMPOTENCY_")}

    assert names == {row[0] for row in SETTINGS}


@pytest.mark.parametrize(
    ("name", "default"), [row[:2] for row in SETTINGS], ids=[row[0] for row in SETTINGS]
)
def test_setting_has_its_default_when_unset(settings, name, default):
    if hasattr(settings, name):
        delattr(settings, name)

    assert getattr(conf, name) == default


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [(row[0], row[2], row[3]) for row in SETTINGS],
    ids=[row[0] for row in SETTINGS],
)
def test_setting_is_read_at_call_time(settings, name, value, expected):
    setattr(settings, name, value)

    assert getattr(conf, name) == expected


def test_methods_setting_is_an_uppercase_frozenset(settings):
    settings.IDEMPOTENCY_METHODS = ("post", "delete")

    methods = conf.IDEMPOTENCY_METHODS

    assert methods == {"POST", "DELETE"}
    assert isinstance(methods, frozenset)


def test_store_is_instantiated_once():
    assert isinstance(get_store(), DatabaseStore)
    assert get_store() is get_store()


def test_store_follows_an_overridden_setting_and_returns_after_it():
    default_store = get_store()

    with override_settings(IDEMPOTENCY_STORE="tests.views.OfflineStore"):
        overridden = get_store()

    assert isinstance(overridden, OfflineStore)
    assert type(get_store()) is DatabaseStore
    assert get_store() is not default_store  # rebuilt once the override was lifted


def test_scope_function_follows_the_setting():
    assert get_scope_function() is user_scope

    with override_settings(IDEMPOTENCY_SCOPE="tests.views.tenant_scope"):
        assert get_scope_function() is tenant_scope

    assert get_scope_function() is user_scope


def test_fingerprint_function_follows_the_setting():
    assert get_fingerprint_function() is request_fingerprint

    with override_settings(IDEMPOTENCY_FINGERPRINT="tests.views.method_and_path_fingerprint"):
        assert get_fingerprint_function() is method_and_path_fingerprint

    assert get_fingerprint_function() is request_fingerprint


def test_changing_another_setting_keeps_the_cached_store(settings):
    store = get_store()

    settings.IDEMPOTENCY_TTL = timedelta(hours=1)

    assert get_store() is store


def test_the_old_name_of_the_lease_is_read_when_the_new_one_is_not_set(settings):
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(minutes=3)

    assert timedelta(minutes=3) == conf.IDEMPOTENCY_LEASE


def test_the_new_name_of_the_lease_wins_over_the_old_one(settings):
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(minutes=3)
    settings.IDEMPOTENCY_LEASE = timedelta(minutes=1)

    assert conf.IDEMPOTENCY_LEASE == conf.IDEMPOTENCY_LOCK_TTL == timedelta(minutes=1)


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_each_default_is_what_conf_answers_when_nothing_is_set(name):
    # DEFAULTS is the one place a default is written; conf, the checks and
    # idempotency_status read it.
    assert getattr(conf, name) == conf.default(name)
