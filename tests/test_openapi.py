"""OpenAPI through drf-spectacular: protected operations document the key, replays and errors.

The suite's own DRF views are documented in-process; the demo project's schema is generated
by its ``/api/schema/`` URL in a subprocess (the suite never imports the demo project).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import override_settings

pytest.importorskip("rest_framework", reason="Django REST Framework is not installed")
pytest.importorskip("drf_spectacular", reason="drf-spectacular is not installed")

from drf_spectacular.generators import SchemaGenerator
from rest_framework.decorators import api_view
from rest_framework.response import Response
from rest_framework.views import APIView

from django_idempotency.decorators import idempotent
from django_idempotency.openapi import IdempotencyViewExtension
from django_idempotency.rest_framework import IdempotentMixin
from tests import urls

ROOT = Path(__file__).resolve().parent.parent
TESTPROJECT = ROOT / "testproject"
CODES = {
    "400": {"idempotency_key_invalid", "idempotency_request_invalid"},
    "409": {"idempotency_key_in_progress", "idempotency_response_not_stored"},
    "422": {"idempotency_key_mismatch"},
    "503": {"idempotency_store_unavailable"},
}


def _schema(*paths: str) -> dict:
    patterns = [pattern for pattern in urls.urlpatterns if str(pattern.pattern) in paths]
    if "" in paths:  # the router's viewset
        patterns += [pattern for pattern in urls.router.urls if "charges" in str(pattern.pattern)]
    return SchemaGenerator(patterns=patterns).get_schema(request=None, public=True)


def _header(operation: dict, name: str = "Idempotency-Key") -> dict | None:
    found = [
        parameter
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "header" and parameter["name"] == name
    ]
    assert len(found) <= 1
    return found[0] if found else None


def assert_documented(schema: dict, operation: dict, *, required: bool) -> None:
    header = _header(operation)
    assert header is not None, operation
    assert header["required"] is required
    assert "1 to 255 printable ASCII characters" in header["description"]
    assert '"abc"' in header["description"]
    for status, codes in CODES.items():
        response = operation["responses"][status]
        media = response["content"]["application/problem+json"]
        assert media["schema"] == {"$ref": "#/components/schemas/IdempotencyProblem"}
        for code in codes:
            assert code in response["description"]
    missing = "idempotency_key_missing" in operation["responses"]["400"]["description"]
    assert missing is required
    assert "Retry-After" in operation["responses"]["409"]["headers"]
    assert "Retry-After" in operation["responses"]["503"]["headers"]
    success = [status for status in operation["responses"] if status.startswith("2")]
    assert success
    for status in success:
        replayed = operation["responses"][status]["headers"]["Idempotent-Replayed"]
        assert replayed["schema"]["enum"] == ["true"]
    problem = schema["components"]["schemas"]["IdempotencyProblem"]
    assert problem["required"] == ["type", "title", "status", "detail", "code"]
    assert problem["properties"]["code"] == {"$ref": "#/components/schemas/IdempotencyProblemCode"}
    assert set().union(*CODES.values(), {"idempotency_key_missing"}) <= set(
        schema["components"]["schemas"]["IdempotencyProblemCode"]["enum"]
    )


def assert_not_documented(operation: dict) -> None:
    assert _header(operation) is None
    assert not {"409", "422", "503"} & set(operation["responses"])
    for response in operation["responses"].values():
        assert "Idempotent-Replayed" not in response.get("headers", {})


def test_a_viewset_with_the_mixin_documents_post_and_patch_only():
    schema = _schema("")
    charges, charge = (
        schema["paths"]["/viewset/charges/"],
        schema["paths"]["/viewset/charges/{id}/"],
    )

    assert_documented(schema, charges["post"], required=False)
    assert_documented(schema, charge["patch"], required=False)
    assert_not_documented(charges["get"])
    assert_not_documented(charge["get"])
    assert_not_documented(charge["put"])
    assert_not_documented(charge["delete"])


def test_a_required_key_is_a_required_header():
    schema = _schema("apiview/", "apiview/optional/")

    assert_documented(schema, schema["paths"]["/apiview/"]["post"], required=True)
    assert_documented(schema, schema["paths"]["/apiview/optional/"]["post"], required=False)


def test_the_required_setting_applies_where_the_view_leaves_it_open(settings):
    settings.IDEMPOTENCY_REQUIRED = True

    schema = _schema("apiview/optional/")

    assert_documented(schema, schema["paths"]["/apiview/optional/"]["post"], required=True)


def test_an_api_view_function_under_idempotent_documents_its_covered_methods():
    schema = _schema("api/", "api/put-only/", "api/required/")
    paths = schema["paths"]

    assert_documented(schema, paths["/api/"]["post"], required=False)
    assert_documented(schema, paths["/api/"]["patch"], required=False)
    assert_not_documented(paths["/api/"]["get"])
    assert_not_documented(paths["/api/"]["put"])
    assert_not_documented(paths["/api/"]["delete"])
    assert_documented(schema, paths["/api/put-only/"]["put"], required=False)
    assert_not_documented(paths["/api/put-only/"]["post"])
    assert_documented(schema, paths["/api/required/"]["post"], required=True)


def test_the_methods_setting_chooses_the_documented_methods(settings):
    settings.IDEMPOTENCY_METHODS = ["POST", "PUT", "DELETE"]

    schema = _schema("api/")
    paths = schema["paths"]

    for method in ("post", "put", "delete"):
        assert_documented(schema, paths["/api/"][method], required=False)
    assert_not_documented(paths["/api/"]["patch"])


def test_a_custom_header_name_is_documented(settings):
    settings.IDEMPOTENCY_HEADER = "X-Request-Key"

    operation = _schema("apiview/")["paths"]["/apiview/"]["post"]

    assert _header(operation) is None
    assert _header(operation, "X-Request-Key")["required"] is True


class PlainView(APIView):
    def post(self, request):
        return Response({})  # pragma: no cover - never called


@api_view(["POST"])
def plain_function(request):
    return Response({})  # pragma: no cover - never called


class MixinView(IdempotentMixin, APIView):
    def post(self, request):
        return Response({})  # pragma: no cover - never called


@api_view(["POST"])
@idempotent
def protected_function(request):
    return Response({})  # pragma: no cover - never called


def test_only_protected_views_match_the_extension():
    assert IdempotencyViewExtension._matches(MixinView)
    assert IdempotencyViewExtension._matches(protected_function.cls)
    assert not IdempotencyViewExtension._matches(PlainView)
    assert not IdempotencyViewExtension._matches(plain_function.cls)


def test_an_unprotected_view_is_left_alone():
    from django.urls import path

    schema = SchemaGenerator(
        patterns=[path("plain/", PlainView.as_view()), path("plainf/", plain_function)]
    ).get_schema(request=None, public=True)

    assert_not_documented(schema["paths"]["/plain/"]["post"])
    assert_not_documented(schema["paths"]["/plainf/"]["post"])
    assert "IdempotencyProblem" not in schema.get("components", {}).get("schemas", {})


def test_a_view_with_a_schema_of_another_kind_is_left_alone():
    from django.urls import path
    from rest_framework.schemas.openapi import AutoSchema as DRFAutoSchema

    class OtherSchemaView(MixinView):
        schema = DRFAutoSchema()

    view = IdempotencyViewExtension(OtherSchemaView.as_view()).view_replacement()()

    assert type(view.schema) is DRFAutoSchema
    assert path  # the import above keeps the test self-contained


@override_settings(IDEMPOTENCY_STORE_SERVER_ERRORS=True)
def test_stored_server_errors_carry_the_replay_header_too():
    from django.urls import path
    from drf_spectacular.utils import extend_schema

    class ServerErrorView(IdempotentMixin, APIView):
        @extend_schema(request=None, responses={201: None, 502: None})
        def post(self, request):
            return Response({})  # pragma: no cover - never called

    schema = SchemaGenerator(patterns=[path("e/", ServerErrorView.as_view())]).get_schema(
        request=None, public=True
    )
    responses = schema["paths"]["/e/"]["post"]["responses"]

    assert "Idempotent-Replayed" in responses["502"]["headers"]
    assert "Idempotent-Replayed" in responses["201"]["headers"]


# -- The demo project's /api/schema/ ----------------------------------------------------------

_FETCH_SCHEMA = """
import django, json, sys
django.setup()
from django.test import Client
response = Client(HTTP_HOST="localhost").get("/api/schema/", {"format": "json"})
answer = {"status": response.status_code, "schema": json.loads(response.content)}
sys.stdout.write(json.dumps(answer))
"""


@pytest.fixture(scope="module")
def demo_schema() -> dict:
    if not (TESTPROJECT / "manage.py").exists():
        pytest.skip("the demo project is not beside the tests (a tox run tests the wheel)")
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PYTHONPATH": os.pathsep.join([str(TESTPROJECT), str(ROOT)]),
        "DATABASE_URL": "sqlite://:memory:",
    }
    environment.pop("REDIS_URL", None)
    result = subprocess.run(
        [sys.executable, "-c", _FETCH_SCHEMA],
        cwd=TESTPROJECT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["status"] == 200
    return answer["schema"]


def test_the_demo_schema_documents_creating_and_changing_orders(demo_schema):
    paths = demo_schema["paths"]

    assert_documented(demo_schema, paths["/api/orders/"]["post"], required=False)
    assert_documented(demo_schema, paths["/api/orders/{id}/"]["patch"], required=False)


def test_the_demo_schema_documents_paying_with_a_required_key(demo_schema):
    operation = demo_schema["paths"]["/api/orders/{id}/pay/"]["post"]

    assert_documented(demo_schema, operation, required=True)


def test_the_demo_schema_leaves_get_operations_alone(demo_schema):
    paths = demo_schema["paths"]

    assert_not_documented(paths["/api/orders/"]["get"])
    assert_not_documented(paths["/api/orders/{id}/"]["get"])
    assert_not_documented(paths["/api/schema/"]["get"])
