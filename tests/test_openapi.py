"""OpenAPI through drf-spectacular: protected operations document the key, replays and errors.

The suite's own DRF views are documented in-process; the demo project's schema is generated
by its ``/api/schema/`` URL in a subprocess (the suite never imports the demo project).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.test import override_settings

pytest.importorskip("rest_framework", reason="Django REST Framework is not installed")
pytest.importorskip("drf_spectacular", reason="drf-spectacular is not installed")

from drf_spectacular.generators import SchemaGenerator
from rest_framework.decorators import api_view
from rest_framework.response import Response
from rest_framework.views import APIView

from django_idempotency.core import MAX_KEY_LENGTH
from django_idempotency.decorators import idempotent
from django_idempotency.openapi import IdempotencyViewExtension
from django_idempotency.rest_framework import IdempotentMixin
from tests import openapi_views, urls

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


def _router_schema(prefix: str) -> dict:
    """The schema of the viewset ``tests.openapi_views`` registers under ``prefix``."""
    patterns = [
        pattern
        for pattern in openapi_views.router.urls
        if str(pattern.pattern).startswith(f"^{prefix}/")
    ]
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
    assert header["schema"]["maxLength"] == MAX_KEY_LENGTH
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


def test_the_key_header_schema_bounds_its_length():
    operation = _schema("apiview/")["paths"]["/apiview/"]["post"]

    schema = _header(operation)["schema"]

    assert schema["minLength"] == 1
    assert schema["maxLength"] == MAX_KEY_LENGTH == 255


def test_every_response_a_replay_can_answer_carries_the_replay_header():
    from django.urls import path
    from drf_spectacular.utils import extend_schema

    class RangesView(IdempotentMixin, APIView):
        @extend_schema(
            request=None,
            responses={
                "2XX": None,
                302: None,
                "4XX": None,
                "5XX": None,
                503: None,
                "default": None,
            },
        )
        def post(self, request):
            return Response({})  # pragma: no cover - never called

    schema = SchemaGenerator(patterns=[path("r/", RangesView.as_view())]).get_schema(
        request=None, public=True
    )
    responses = schema["paths"]["/r/"]["post"]["responses"]

    # Every returned response below 500 is stored (core._stored_response), so any of these
    # statuses may be a replay; "default" stands for statuses the view left undocumented.
    for status in ("2XX", "302", "4XX", "default"):
        assert "Idempotent-Replayed" in responses[status]["headers"], status
    for status in ("5XX", "503"):
        assert "Idempotent-Replayed" not in responses[status].get("headers", {}), status
    # This layer's own answers are never stored, so never replayed.
    for status in ("409", "422"):
        assert "Idempotent-Replayed" not in responses[status].get("headers", {}), status


@override_settings(IDEMPOTENCY_STORE_SERVER_ERRORS=True)
def test_a_server_error_range_carries_the_replay_header_when_server_errors_are_stored():
    from django.urls import path
    from drf_spectacular.utils import extend_schema

    class ServerErrorRangeView(IdempotentMixin, APIView):
        @extend_schema(request=None, responses={201: None, "5XX": None})
        def post(self, request):
            return Response({})  # pragma: no cover - never called

    schema = SchemaGenerator(patterns=[path("s/", ServerErrorRangeView.as_view())]).get_schema(
        request=None, public=True
    )

    assert "Idempotent-Replayed" in schema["paths"]["/s/"]["post"]["responses"]["5XX"]["headers"]


@override_settings(IDEMPOTENCY_STORED_STATUSES=("2xx", 404))
def test_the_replay_header_follows_the_stored_statuses_setting():
    from django.urls import path
    from drf_spectacular.utils import extend_schema

    class StatusesView(IdempotentMixin, APIView):
        @extend_schema(
            request=None,
            responses={201: None, 302: None, 400: None, 404: None, "4XX": None, "5XX": None},
        )
        def post(self, request):
            return Response({})  # pragma: no cover - never called

    schema = SchemaGenerator(patterns=[path("t/", StatusesView.as_view())]).get_schema(
        request=None, public=True
    )
    responses = schema["paths"]["/t/"]["post"]["responses"]

    # 404 alone of the 4xx is stored, so the range may hold a replay; 302 and 400 may not.
    for status in ("201", "404", "4XX"):
        assert "Idempotent-Replayed" in responses[status]["headers"], status
    for status in ("302", "400", "5XX"):
        assert "Idempotent-Replayed" not in responses[status].get("headers", {}), status


@override_settings(IDEMPOTENCY_STORED_STATUSES=("2xx",))
def test_the_replay_header_follows_the_stored_statuses_option_of_the_view():
    from django.urls import path
    from drf_spectacular.utils import extend_schema

    class MixinStatusesView(IdempotentMixin, APIView):
        idempotency_stored_statuses = ("5xx", 409)

        @extend_schema(request=None, responses={201: None, 409: None, 502: None})
        def post(self, request):
            return Response({})  # pragma: no cover - never called

    @extend_schema(request=None, responses={201: None, 410: None}, methods=["POST"])
    @api_view(["POST"])
    @idempotent(stored_statuses=("4xx",))
    def function_statuses(request):
        return Response({})  # pragma: no cover - never called

    schema = SchemaGenerator(
        patterns=[
            path("m/", MixinStatusesView.as_view()),
            path("f/", function_statuses),
        ]
    ).get_schema(request=None, public=True)
    mixin = schema["paths"]["/m/"]["post"]["responses"]
    function = schema["paths"]["/f/"]["post"]["responses"]

    # The view's own list wins over the setting's "2xx".
    assert "Idempotent-Replayed" not in mixin["201"].get("headers", {})
    assert "Idempotent-Replayed" in mixin["409"]["headers"]
    assert "Idempotent-Replayed" in mixin["502"]["headers"]
    assert "Idempotent-Replayed" not in function["201"].get("headers", {})
    assert "Idempotent-Replayed" in function["410"]["headers"]


@pytest.mark.parametrize(
    ("ttl", "words"),
    [
        (None, "kept for 1 day after"),
        (timedelta(minutes=90), "kept for 1 hour, 30 minutes after"),
        (timedelta(days=2, seconds=1), "kept for 2 days, 1 second after"),
        (timedelta(milliseconds=500), "kept for 0.5 seconds after"),
    ],
)
def test_the_key_parameter_states_how_long_a_key_is_kept(ttl, words):
    from django.urls import path

    class TtlView(IdempotentMixin, APIView):
        idempotency_ttl = ttl

        def post(self, request):
            return Response({})  # pragma: no cover - never called

    schema = SchemaGenerator(patterns=[path("k/", TtlView.as_view())]).get_schema(
        request=None, public=True
    )

    assert words in _header(schema["paths"]["/k/"]["post"])["description"]


@override_settings(IDEMPOTENCY_TTL=timedelta(hours=6))
def test_the_key_parameter_states_the_ttl_setting():
    operation = _schema("apiview/")["paths"]["/apiview/"]["post"]

    assert (
        "A key is kept for 6 hours after its request finished"
        in (_header(operation)["description"])
    )


# -- The view's own get_idempotency_options() -------------------------------------------------


def test_an_override_that_requires_the_key_is_documented_as_required():
    schema = _router_schema("override/required")
    paths = schema["paths"]

    assert_documented(schema, paths["/override/required/"]["post"], required=True)
    assert_documented(schema, paths["/override/required/{id}/"]["patch"], required=True)


def test_an_override_that_narrows_the_methods_documents_those_methods_only():
    schema = _router_schema("override/post-only")
    paths = schema["paths"]

    assert_documented(schema, paths["/override/post-only/"]["post"], required=False)
    assert_not_documented(paths["/override/post-only/{id}/"]["patch"])
    assert_not_documented(paths["/override/post-only/{id}/"]["put"])


def test_methods_passed_to_as_view_choose_the_documented_operations():
    from django.urls import path

    view = MixinView.as_view(idempotency_required=True, idempotency_methods=["PUT"])

    schema = SchemaGenerator(patterns=[path("init/", view)]).get_schema(request=None, public=True)

    # MixinView has post only: PUT, the one method covered, has no operation to document.
    assert_not_documented(schema["paths"]["/init/"]["post"])


def test_a_required_key_passed_to_as_view_is_documented_as_required():
    from django.urls import path

    view = MixinView.as_view(idempotency_required=True)

    schema = SchemaGenerator(patterns=[path("init/", view)]).get_schema(request=None, public=True)

    assert_documented(schema, schema["paths"]["/init/"]["post"], required=True)


def test_a_viewset_without_a_docstring_is_not_described_by_the_mixin():
    schema = _router_schema("undocumented")

    operations = [operation for item in schema["paths"].values() for operation in item.values()]
    assert len(operations) == 6
    for operation in operations:
        assert "description" not in operation, operation["description"]


def test_a_viewset_keeps_a_docstring_of_its_own_or_of_a_base_after_the_mixin():
    own = _router_schema("override/required")["paths"]["/override/required/"]
    by_base = _router_schema("documented-by-base")["paths"]["/documented-by-base/"]

    assert own["post"]["description"] == openapi_views.RequiredByOverrideViewSet.__doc__
    assert by_base["post"]["description"] == openapi_views.DocumentedBase.__doc__


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


# -- ConditionalUpdateMixin -------------------------------------------------------------------


def _conditional_schema(prefix: str) -> dict:
    from tests import conditional_views

    patterns = [
        pattern
        for pattern in conditional_views.router.urls
        if str(pattern.pattern).startswith(f"^{prefix}/")
    ]
    return SchemaGenerator(patterns=patterns).get_schema(request=None, public=True)


def test_a_conditional_viewset_documents_etag_if_match_and_412():
    paths = _conditional_schema("documents")["paths"]
    detail = paths["/documents/{id}/"]

    assert "ETag" in detail["get"]["responses"]["200"]["headers"]
    assert "ETag" not in paths["/documents/"]["get"]["responses"]["200"].get("headers", {})
    for method in ("put", "patch", "delete"):
        operation = detail[method]
        if_match = _header(operation, "If-Match")
        assert if_match is not None, method
        assert if_match["required"] is False
        problem = operation["responses"]["412"]["content"]["application/problem+json"]
        assert problem["schema"] == {"$ref": "#/components/schemas/PreconditionProblem"}
        assert "428" not in operation["responses"]
    assert "ETag" in detail["put"]["responses"]["200"]["headers"]
    assert _header(paths["/documents/"]["post"], "If-Match") is None


def test_a_required_precondition_is_a_required_header_answered_428_without_it():
    schema = _conditional_schema("required")
    operation = schema["paths"]["/required/{id}/"]["patch"]

    assert _header(operation, "If-Match")["required"] is True
    assert "428" in operation["responses"]
    components = schema["components"]["schemas"]
    code = components["PreconditionProblem"]["properties"]["code"]
    assert code == {"$ref": "#/components/schemas/PreconditionProblemCode"}
    assert components["PreconditionProblemCode"]["enum"] == [
        "precondition_failed",
        "precondition_required",
    ]


def test_a_keyed_conditional_viewset_documents_both_headers():
    operation = _conditional_schema("keyed")["paths"]["/keyed/{id}/"]["put"]

    assert _header(operation, "Idempotency-Key") is not None
    assert _header(operation, "If-Match")["required"] is True
    assert {"409", "412", "422", "428"} <= set(operation["responses"])


def test_a_conditional_viewset_without_a_docstring_is_not_described_by_the_mixin():
    operation = _conditional_schema("documents")["paths"]["/documents/{id}/"]["put"]

    assert "If-Match" not in operation.get("description", "")
