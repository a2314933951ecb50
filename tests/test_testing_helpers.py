"""``django_idempotency.testing``: the assertions a project adds to its own suite.

They pass on protected endpoints and fail, saying what differed, on everything else. The
example of docs/testing.md runs against the demo project in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from django.db import connection
from django.http import HttpResponse

from django_idempotency.testing import (
    _assert_replay,
    assert_idempotent,
    assert_idempotent_concurrently,
)
from tests.models import Charge

ROOT = Path(__file__).resolve().parent.parent
TESTPROJECT = ROOT / "testproject"
DOCS = ROOT / "docs"
HAS_DRF = find_spec("rest_framework") is not None
# Threads racing one key need a database with concurrent writers: not SQLite in memory.
CONCURRENT_WRITERS = connection.vendor != "sqlite" or bool(os.environ.get("SQLITE_TEST_FILE"))
DATA = {"amount": 5}


@pytest.mark.django_db
def test_a_protected_endpoint_passes(client, runs):
    check = assert_idempotent(client, "/sync/", DATA, effect=Charge.objects.count, retries=2)

    assert check.response.status_code == 201
    assert len(check.replays) == 2
    assert runs == ["/sync/"]


@pytest.mark.django_db
def test_each_call_uses_a_fresh_key(client):
    first = assert_idempotent(client, "/sync/", DATA, effect=Charge.objects.count)
    second = assert_idempotent(client, "/sync/", DATA, effect=Charge.objects.count)

    assert first.key != second.key
    assert Charge.objects.count() == 2


@pytest.mark.django_db
def test_an_unprotected_endpoint_fails_saying_it_ran_twice(client):
    with pytest.raises(AssertionError, match=r"POST /plain/ ran more than once: effect\(\) was 0"):
        assert_idempotent(client, "/plain/", DATA, effect=Charge.objects.count)


@pytest.mark.django_db
def test_an_effect_that_does_not_change_fails(client):
    with pytest.raises(AssertionError, match="had no effect"):
        assert_idempotent(client, "/sync/", DATA, effect=lambda: 0)


@pytest.mark.django_db
def test_a_server_error_first_fails(client):
    with pytest.raises(AssertionError, match="failed with 500"):
        assert_idempotent(client, "/sync/?behaviour=500", DATA, effect=Charge.objects.count)


@pytest.mark.django_db
@pytest.mark.usefixtures("offline_store")
def test_an_answer_of_this_layer_first_fails(client):
    with pytest.raises(AssertionError, match="answered by django-idempotency: 503"):
        assert_idempotent(client, "/sync/", DATA, effect=Charge.objects.count)


@pytest.mark.django_db
def test_a_key_used_before_fails(client):
    assert_idempotent(client, "/sync/", DATA, effect=Charge.objects.count, key="used")

    with pytest.raises(AssertionError, match="already a replay"):
        assert_idempotent(client, "/sync/", DATA, effect=Charge.objects.count, key="used")


@pytest.mark.django_db
def test_a_method_not_covered_fails_saying_it_was_not_replayed(client, settings):
    settings.IDEMPOTENCY_METHODS = ["PATCH"]

    with pytest.raises(AssertionError, match="ran more than once"):
        assert_idempotent(client, "/sync/", DATA, effect=Charge.objects.count)


def _response(status=201, body=b"{}", replayed=True, **headers):
    response = HttpResponse(body, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    if replayed:
        response["Idempotent-Replayed"] = "true"
    return response


@pytest.mark.parametrize(
    ("replay", "words"),
    [
        (_response(replayed=False), "was not replayed"),
        (_response(status=200), "status 200 differs from the first response's 201"),
        (_response(body=b'{"id": 2}'), "body differs"),
        (_response(Location="/b"), "Location"),
    ],
)
def test_a_replay_that_differs_fails_saying_how(replay, words):
    first = _response(replayed=False, Location="/a")
    if "Location" not in words:
        replay["Location"] = "/a"

    with pytest.raises(
        AssertionError,
        match=re.escape(words) if "Location" not in words else "location: '/a' then '/b'",
    ):
        _assert_replay(first, replay, "POST /x/")


def test_per_response_headers_may_differ():
    first = _response(replayed=False, Date="Mon", Vary="Cookie")

    _assert_replay(first, _response(Date="Tue"), "POST /x/")


@pytest.mark.skipif(not HAS_DRF, reason="Django REST Framework is not installed")
@pytest.mark.django_db
def test_a_drf_client_with_format_passes(api_client, runs):
    check = assert_idempotent(
        api_client, "/viewset/charges/", DATA, format="json", effect=Charge.objects.count
    )

    assert check.response.status_code == 201
    assert runs == ["/viewset/charges/"]


@pytest.mark.django_db
def test_the_concurrent_variant_refuses_to_run_inside_a_transaction(client):
    with pytest.raises(AssertionError, match=r"django_db\(transaction=True\)"):
        assert_idempotent_concurrently(client, "/sync/", DATA, effect=Charge.objects.count)


@pytest.mark.skipif(not CONCURRENT_WRITERS, reason="SQLite in memory has no concurrent writers")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/sync/?behaviour=sleep0.2", "/sync/lease/?behaviour=sleep0.2"])
def test_concurrent_duplicates_run_once(client, path):
    check = assert_idempotent_concurrently(client, path, DATA, effect=Charge.objects.count)

    assert check.response.status_code == 201
    assert Charge.objects.count() == 1


@pytest.mark.skipif(not CONCURRENT_WRITERS, reason="SQLite in memory has no concurrent writers")
@pytest.mark.django_db(transaction=True)
def test_concurrent_runs_of_an_unprotected_view_fail(client):
    with pytest.raises(AssertionError, match="of 3 concurrent requests with one key ran the view"):
        assert_idempotent_concurrently(
            client, "/plain/", DATA, requests=3, effect=Charge.objects.count
        )


# -- The docs' example, against the demo project ----------------------------------------------


def _example() -> str:
    text = (DOCS / "testing.md").read_text(encoding="utf-8")
    example = text.split("## Example", 1)[1]
    return re.search(r"```python\n(.*?)```", example, re.S).group(1)


@pytest.mark.skipif(not HAS_DRF, reason="Django REST Framework is not installed")
def test_the_documented_example_passes_against_the_demo_project(tmp_path):
    if not (TESTPROJECT / "manage.py").exists():
        pytest.skip("the demo project is not beside the tests (a tox run tests the wheel)")
    (tmp_path / "test_example.py").write_text(_example(), encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PYTHONPATH": os.pathsep.join([str(TESTPROJECT), str(ROOT)]),
        "SQLITE_TEST_FILE": str(tmp_path / "test.sqlite3"),
    }
    for name in ("REDIS_URL", "DATABASE_URL"):
        environment.pop(name, None)  # the demo on SQLite, as a project would start
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "-c",
            str(tmp_path / "pytest.ini"),
            str(tmp_path / "test_example.py"),
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
