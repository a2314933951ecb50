"""Fixtures shared by the suite, and the rules for tests that need an outside service.

``DATABASE_URL`` selects PostgreSQL or MariaDB/MySQL (SQLite in memory without it) and
``REDIS_URL`` a Redis server. A test marked ``redis`` is skipped, with its reason, when Redis is
not configured or not reachable; when ``IDEMPOTENCY_REQUIRE_SERVICES=1`` (CI sets it) it fails
instead, so a green CI run cannot hide a missing service.
"""

from __future__ import annotations

import base64
import os
import socket
from datetime import timedelta
from functools import cache
from importlib.util import find_spec
from urllib.parse import urlsplit

import pytest
from django.conf import settings as django_settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.utils import load_backend
from django.utils import timezone

from tests.factories import PASSWORD, UserFactory

REQUIRE_SERVICES = "IDEMPOTENCY_REQUIRE_SERVICES"
OFFLINE_ALIAS = "offline"


def _services_required() -> bool:
    return os.environ.get(REQUIRE_SERVICES, "") not in ("", "0")


@cache
def _redis_problem() -> str | None:
    """Why the Redis tests cannot run, or ``None`` when they can."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return "REDIS_URL is not set"
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 6379)
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError as exc:
        return f"Redis at {address[0]}:{address[1]} is not reachable ({exc.strerror or exc})"
    return None


def _database_description() -> str:
    database = django_settings.DATABASES[DEFAULT_DB_ALIAS]
    vendor = database["ENGINE"].rsplit(".", 1)[-1]
    test_name = (database.get("TEST") or {}).get("NAME")
    if vendor == "sqlite3":
        return f"SQLite ({test_name or 'in memory'})"
    vendor = {"postgresql": "PostgreSQL", "mysql": "MariaDB/MySQL"}.get(vendor, vendor)
    host = f"{database.get('HOST') or 'localhost'}:{database.get('PORT') or 'default port'}"
    return f"{vendor} at {host}, test database {test_name or 'test_' + database['NAME']}"


def pytest_report_header(config) -> str:
    """One line: the database of this run and which service tests will not run."""
    parts = [f"database {_database_description()}"]
    if problem := _redis_problem():
        verdict = f"FAIL ({REQUIRE_SERVICES} is set)" if _services_required() else "skipped"
        parts.append(f"redis tests {verdict}: {problem}")
    else:
        parts.append("redis tests run")
    if django_settings.DATABASES[DEFAULT_DB_ALIAS]["ENGINE"].endswith("sqlite3"):
        parts.append("row-lock concurrency tests skipped: SQLite has no row locks")
    if not find_spec("rest_framework"):
        parts.append("DRF tests skipped: djangorestframework is not installed")
    return "django-idempotency: " + "; ".join(parts)


def pytest_collection_modifyitems(config, items) -> None:
    """Deselect (not skip) the ``topology`` tests unless IDEMPOTENCY_TOPOLOGIES=1 asks for them.

    They start whole topologies (HAProxy in front of gunicorn instances, Redis Sentinel and
    Cluster) and take minutes: ``scripts/topologies.sh`` runs them, the default suite and CI do
    not (docs/scaling.md).
    """
    if os.environ.get("IDEMPOTENCY_TOPOLOGIES") == "1":
        return
    deselected = [item for item in items if item.get_closest_marker("topology") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("topology") is None]


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("redis") is None:
        return
    if (problem := _redis_problem()) is None:
        return
    if _services_required():
        pytest.fail(f"needs Redis, but {problem} and {REQUIRE_SERVICES} is set", pytrace=False)
    pytest.skip(f"needs Redis: {problem}")


# -- Fixtures -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def runs():
    """The runs of the views under test during this test, in order (see ``tests.views``)."""
    from tests import views

    views.RUNS.clear()
    yield views.RUNS
    views.RUNS.clear()


@pytest.fixture
def alice(db):
    return UserFactory(username="alice")


@pytest.fixture
def bob(db):
    return UserFactory(username="bob")


@pytest.fixture
def basic_auth():
    """``basic_auth(user)``: the headers that authenticate ``user`` with HTTP Basic."""

    def headers(user) -> dict[str, str]:
        token = base64.b64encode(f"{user.username}:{PASSWORD}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    return headers


@pytest.fixture
def api_client(alice):
    """A DRF ``APIClient`` logged in (with a session) as alice."""
    test = pytest.importorskip("rest_framework.test")
    client = test.APIClient()
    client.login(username=alice.username, password=PASSWORD)
    return client


@pytest.fixture(params=["database", pytest.param("cache", marks=pytest.mark.redis)])
def store(request):
    """Run the test once with each store; the store's harness (``tests/store_harness.py``).

    The cache variant uses ``CacheStore`` on the ``redis`` cache under a key prefix of the
    test's own, whose keys are deleted before and after the test, so no test sees another's.
    """
    from tests.store_harness import harness_for

    harness = harness_for(request.param, request)
    harness.clear()
    yield harness
    harness.clear()


@pytest.fixture(params=["auto", "orm"])
def statements(request, monkeypatch):
    """Run the test once with each of ``DatabaseStore``'s statement strategies (docs/stores.md).

    ``"auto"`` is the plain SQL written for the database's vendor, ``"orm"`` the ORM. Only the
    store and query-budget suites use it. Where ``"auto"`` is the ORM already (SQLite), the
    ``"orm"`` run would repeat it, and is skipped.
    """
    from django.db import connection

    from django_idempotency.stores import DatabaseStore
    from django_idempotency.stores.sql import SQL_STATEMENTS

    if request.param == "orm" and connection.vendor not in SQL_STATEMENTS:
        pytest.skip(f"on {connection.vendor} the 'auto' statements are the ORM's already")
    monkeypatch.setattr(DatabaseStore, "statements", request.param)
    return request.param


@pytest.fixture
def offline_store(settings, tmp_path):
    """Make ``IDEMPOTENCY_STORE`` a database store whose database cannot be reached.

    The connection ``offline`` opens an SQLite file in a directory that does not exist, so
    every query fails to connect, as with a database server that is down. It exists in this
    thread only, which is where the test client runs views (async ones included).
    """
    missing = tmp_path / "no-such-directory" / "keys.sqlite3"
    configured = connections.configure_settings(
        {
            DEFAULT_DB_ALIAS: {"ENGINE": "django.db.backends.dummy"},
            OFFLINE_ALIAS: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(missing)},
        }
    )
    offline = load_backend("django.db.backends.sqlite3").DatabaseWrapper(
        configured[OFFLINE_ALIAS], OFFLINE_ALIAS
    )
    connections[OFFLINE_ALIAS] = offline
    settings.IDEMPOTENCY_STORE = "tests.views.OfflineStore"
    yield
    offline.close()
    del connections[OFFLINE_ALIAS]


@pytest.fixture
def app_clock(monkeypatch):
    """``app_clock(offset)``: move the application's clock (``timezone.now``) by ``offset``.

    The database's clock does not move, so a test can tell which of the two a deadline is
    compared with.
    """
    real_now = timezone.now

    def move(offset: timedelta) -> None:
        monkeypatch.setattr(timezone, "now", lambda: real_now() + offset)

    return move
