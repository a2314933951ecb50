"""``manage.py idempotency_status``: settings, store and replay cache health, checks, --json."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.cache.backends.base import BaseCache
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.factories import IdempotencyKeyFactory

pytestmark = pytest.mark.django_db


class CustomStore:
    """A project's own store: named, its health not measured."""


class BrokenCache(BaseCache):
    """A cache whose server cannot be reached."""

    def __init__(self, location, params):
        super().__init__(params)

    def get(self, key, default=None, version=None):
        raise ConnectionError("connection refused")


def _run(*args: str) -> str:
    out = StringIO()
    call_command("idempotency_status", *args, stdout=out)
    return out.getvalue()


def _report() -> dict:
    return json.loads(_run("--json"))


def test_every_setting_is_listed_and_non_defaults_are_marked(settings):
    settings.IDEMPOTENCY_TTL = timedelta(hours=2)
    settings.IDEMPOTENCY_HEADER = "Idempotency-Key"  # set, but to the default

    text = _run()

    assert " * IDEMPOTENCY_TTL = datetime.timedelta(seconds=7200)" in text
    assert "   IDEMPOTENCY_HEADER = 'Idempotency-Key'" in text
    assert "   IDEMPOTENCY_MIDDLEWARE_PATHS = ()" in text


def test_json_reports_settings_with_their_default_flag(settings):
    settings.IDEMPOTENCY_REQUIRED = True

    report = _report()

    assert report["settings"]["IDEMPOTENCY_REQUIRED"] == {
        "value": True,
        "repr": "True",
        "default": False,
    }
    assert report["settings"]["IDEMPOTENCY_METHODS"]["value"] == ["PATCH", "POST"]
    assert report["settings"]["IDEMPOTENCY_TTL"]["value"] == "1 day, 0:00:00"


def test_the_database_store_reports_keys_by_state_and_expired():
    IdempotencyKeyFactory.create_batch(2, completed=True)
    IdempotencyKeyFactory(in_progress=True)
    IdempotencyKeyFactory(expired=True)

    store = _report()["store"]

    assert store["ok"] is True
    assert store["kind"] == "database"
    assert store["class"] == "django_idempotency.stores.DatabaseStore"
    assert sum(store["keys"].values()) == 4
    assert store["keys"]["in_progress"] >= 1
    assert store["expired"] == 1
    assert "keys: in_progress" in _run()


@pytest.mark.usefixtures("offline_store")
def test_an_unreachable_database_store_fails_with_status_1():
    out = StringIO()
    with pytest.raises(CommandError, match="The idempotency store is unreachable"):
        call_command("idempotency_status", stdout=out)

    assert "unreachable" in out.getvalue()


def test_a_custom_store_is_named_without_health(settings):
    settings.IDEMPOTENCY_STORE = "tests.test_idempotency_status.CustomStore"

    store = _report()["store"]

    assert store == {
        "kind": "custom",
        "ok": True,
        "note": "health not measured",
        "class": "tests.test_idempotency_status.CustomStore",
    }
    assert "health not measured" in _run()


def test_a_store_that_cannot_be_imported_fails(settings):
    settings.IDEMPOTENCY_STORE = "nowhere.Store"

    with pytest.raises(CommandError, match=r"nowhere\.Store"):
        _run("--json")


def test_the_replay_cache_is_pinged(settings):
    settings.IDEMPOTENCY_REPLAY_CACHE = "default"

    replay = _report()["replay_cache"]

    assert replay["ok"] is True
    assert replay["alias"] == "default"
    assert "latency_ms" in replay


def test_an_unreachable_replay_cache_is_reported_without_failing(settings):
    settings.CACHES = {
        **settings.CACHES,
        "broken": {"BACKEND": "tests.test_idempotency_status.BrokenCache"},
    }
    settings.IDEMPOTENCY_REPLAY_CACHE = "broken"

    report = _report()

    assert report["store"]["ok"] is True
    assert report["replay_cache"]["ok"] is False
    text = _run()
    assert "Replay cache" in text
    assert "unreachable" in text


def test_the_replay_cache_off_is_said():
    assert "off (IDEMPOTENCY_REPLAY_CACHE = None)" in _run()
    assert _report()["replay_cache"] is None


def test_check_messages_of_the_app_are_listed(settings):
    settings.IDEMPOTENCY_METHODS = ["POST", "GET"]
    settings.IDEMPOTENCY_MIDDLEWARE_PATHS = ["("]

    report = _report()
    text = _run()

    assert {message["id"] for message in report["checks"]} >= {
        "django_idempotency.W002",
        "django_idempotency.E018",
    }
    levels = {message["id"]: message["level"] for message in report["checks"]}
    assert levels["django_idempotency.E018"] == "error"
    assert levels["django_idempotency.W002"] == "warning"
    assert "django_idempotency.E018: IDEMPOTENCY_MIDDLEWARE_PATHS" in text
    assert "HINT:" in text


def test_no_check_messages_says_so():
    assert "no issues" in _run()


def test_verbosity_0_prints_nothing():
    assert _run("--verbosity", "0") == ""


@pytest.mark.redis
def test_the_cache_store_is_pinged(settings):
    settings.IDEMPOTENCY_STORE = "django_idempotency.stores.CacheStore"
    settings.IDEMPOTENCY_STORE_CACHE = "redis"

    store = _report()["store"]

    assert store["ok"] is True
    assert store["kind"] == "cache"
    assert store["alias"] == "redis"


@pytest.fixture
def keys_table_missing(transactional_db):
    """The keys table dropped, as in a deployment that forgot `migrate`; put back after."""
    from django.db import connection

    from django_idempotency.models import IdempotencyKey

    with connection.schema_editor() as editor:
        editor.delete_model(IdempotencyKey)
    try:
        yield
    finally:
        with connection.schema_editor() as editor:
            editor.create_model(IdempotencyKey)


def test_a_missing_table_is_reported_with_run_migrate(keys_table_missing):
    with pytest.raises(CommandError) as caught:
        _run()

    assert "run `python manage.py migrate django_idempotency`" in str(caught.value)


def test_a_keyed_request_without_the_table_answers_a_problem_and_logs_run_migrate(
    keys_table_missing, caplog
):
    from django.test import Client

    client = Client(raise_request_exception=False)

    with caplog.at_level("ERROR", logger="django_idempotency"):
        response = client.post(
            "/sync/",
            {"amount": 1},
            content_type="application/json",
            headers={"Idempotency-Key": "k"},
        )

    assert response.status_code == 503, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert json.loads(response.content)["code"] == "idempotency_store_unavailable"
    assert any(
        "run `python manage.py migrate django_idempotency`" in record.getMessage()
        for record in caplog.records
    )
