"""``IdempotencyMiddleware``: chosen paths protected without touching their views.

The same engine as ``@idempotent``: the same answers, the same storing rule; views already
protected are left to their own protection; its checks (E018, W006, W007, W008).
"""

from __future__ import annotations

from importlib.util import find_spec

import pytest
from asgiref.sync import async_to_sync
from django.test import override_settings

from django_idempotency import signals
from django_idempotency.checks import check_middleware, check_settings
from django_idempotency.middleware import IdempotencyMiddleware, view_options
from tests import views
from tests.assertions import assert_problem
from tests.models import Charge

pytestmark = pytest.mark.django_db

MIDDLEWARE_PATH = "django_idempotency.middleware.IdempotencyMiddleware"
HAS_DRF = find_spec("rest_framework") is not None
KEY = {"Idempotency-Key": "mw-key-1"}


@pytest.fixture(autouse=True)
def middleware(settings):
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, MIDDLEWARE_PATH]
    settings.IDEMPOTENCY_MIDDLEWARE_PATHS = [r"^/plain/", r"^/sync/$", r"^/apiview/$", r"^/api/$"]


@pytest.fixture
def claims():
    """The modes of the claims made during the test (``signals.key_claimed``), in order."""
    made: list[str] = []

    def receiver(sender, mode, **kwargs):
        made.append(mode)

    signals.key_claimed.connect(receiver)
    yield made
    signals.key_claimed.disconnect(receiver)


def _post(client, path, data=None, headers=KEY, **extra):
    return client.post(
        path, data or {"amount": 5}, content_type="application/json", headers=headers, **extra
    )


def test_a_covered_path_runs_its_view_once_and_replays(client, runs):
    first = _post(client, "/plain/")
    second = _post(client, "/plain/")

    assert first.status_code == second.status_code == 201
    assert second.content == first.content
    assert second["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert second["Location"] == first["Location"]
    assert runs == ["/plain/"]
    assert Charge.objects.count() == 1


def test_a_path_not_listed_is_not_covered(client, runs, settings):
    settings.IDEMPOTENCY_MIDDLEWARE_PATHS = [r"^/plain/$"]

    _post(client, "/plain/again/")
    _post(client, "/plain/again/")

    assert runs == ["/plain/again/", "/plain/again/"]


def test_without_paths_the_middleware_covers_nothing(client, runs, settings):
    settings.IDEMPOTENCY_MIDDLEWARE_PATHS = []

    _post(client, "/plain/")
    _post(client, "/plain/")

    assert len(runs) == 2


def test_safe_methods_are_never_covered(client, runs):
    client.get("/plain/", headers=KEY)
    client.get("/plain/", headers=KEY)

    assert len(runs) == 2


def test_methods_follow_the_methods_setting(client, runs, settings):
    settings.IDEMPOTENCY_METHODS = ["PUT"]

    _post(client, "/plain/")
    _post(client, "/plain/")
    client.put("/plain/", {"amount": 5}, content_type="application/json", headers=KEY)
    replay = client.put("/plain/", {"amount": 5}, content_type="application/json", headers=KEY)

    assert len(runs) == 3
    assert replay["Idempotent-Replayed"] == "true"


def test_the_same_key_for_another_request_is_a_mismatch(client, runs):
    _post(client, "/plain/")

    response = _post(client, "/plain/", {"amount": 6})

    assert_problem(response, 422, "idempotency_key_mismatch")
    assert runs == ["/plain/"]


def test_an_invalid_key_is_refused_before_the_view(client, runs):
    response = _post(client, "/plain/", headers={"Idempotency-Key": ""})

    assert_problem(response, 400, "idempotency_key_invalid")
    assert runs == []


def test_a_required_key_follows_the_required_setting(client, runs, settings):
    settings.IDEMPOTENCY_REQUIRED = True

    response = _post(client, "/plain/", headers={})

    assert_problem(response, 400, "idempotency_key_missing")
    assert runs == []


def test_without_a_key_the_view_runs_unprotected(client, runs):
    _post(client, "/plain/", headers={})
    _post(client, "/plain/", headers={})

    assert len(runs) == 2


def test_a_view_that_raises_stores_nothing_and_frees_the_key(client, runs):
    client.raise_request_exception = False

    failed = _post(client, "/plain/?behaviour=raise")
    retried = _post(client, "/plain/?behaviour=raise")

    assert failed.status_code == retried.status_code == 500
    assert "Idempotent-Replayed" not in retried
    assert len(runs) == 2
    assert Charge.objects.count() == 0  # the atomic mode rolled the view's writes back


def test_a_server_error_is_not_stored(client, runs):
    _post(client, "/plain/?behaviour=500")
    _post(client, "/plain/?behaviour=500")

    assert len(runs) == 2


def test_a_view_protected_by_idempotent_is_claimed_once(client, runs):
    first = _post(client, "/sync/")
    second = _post(client, "/sync/")

    assert first.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert runs == ["/sync/"]


def test_an_async_view_under_asgi_is_protected_in_the_lease_mode(async_client, runs):
    first = async_to_sync(async_client.post)(
        "/plain/async/", {"amount": 5}, content_type="application/json", headers=KEY
    )
    second = async_to_sync(async_client.post)(
        "/plain/async/", {"amount": 5}, content_type="application/json", headers=KEY
    )

    assert first.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert second.content == first.content
    assert runs == ["/plain/async/"]


def test_an_async_view_that_raises_stores_nothing(async_client, runs):
    async_client.raise_request_exception = False

    async_to_sync(async_client.post)(
        "/plain/async/?behaviour=raise", {"amount": 5}, content_type="application/json", headers=KEY
    )
    retried = async_to_sync(async_client.post)(
        "/plain/async/?behaviour=raise", {"amount": 5}, content_type="application/json", headers=KEY
    )

    assert retried.status_code == 500
    assert len(runs) == 2


def test_an_async_error_answer_is_problem_json(async_client, runs):
    response = async_to_sync(async_client.post)(
        "/plain/async/",
        {"amount": 5},
        content_type="application/json",
        headers={"Idempotency-Key": ""},
    )

    assert_problem(response, 400, "idempotency_key_invalid")
    assert runs == []


def test_an_unresolved_path_passes_through(client):
    response = _post(client, "/plain/nowhere/")

    assert response.status_code == 404


def test_a_request_without_the_middleware_call_is_ignored(rf):
    middleware = IdempotencyMiddleware(lambda request: None)
    request = rf.post("/plain/", headers=KEY)

    assert middleware.process_view(request, views.plain_charge, (), {}) is None
    middleware.process_exception(request, RuntimeError())


@pytest.mark.skipif(not HAS_DRF, reason="Django REST Framework is not installed")
def test_a_drf_view_with_the_mixin_is_claimed_once(api_client, runs):
    first = api_client.post("/apiview/", {"amount": 5}, format="json", headers=KEY)
    second = api_client.post("/apiview/", {"amount": 5}, format="json", headers=KEY)

    assert first.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert runs == ["/apiview/"]


@pytest.mark.skipif(not HAS_DRF, reason="Django REST Framework is not installed")
def test_an_api_view_under_idempotent_is_claimed_once(api_client, runs):
    api_client.post("/api/", {"amount": 5}, format="json", headers=KEY)
    second = api_client.post("/api/", {"amount": 5}, format="json", headers=KEY)

    assert second["Idempotent-Replayed"] == "true"
    assert runs == ["/api/"]


@pytest.mark.skipif(not HAS_DRF, reason="Django REST Framework is not installed")
@pytest.mark.parametrize("path", ["/override/apiview/", "/wrapped/apiview/"])
def test_a_mixin_view_is_left_to_its_own_get_idempotency_options(
    api_client, runs, claims, settings, path
):
    # RequiredByOverrideAPIView's attribute leaves the key optional, its override requires it;
    # /wrapped/ serves it under a decorator written without functools.wraps.
    settings.ROOT_URLCONF = "tests.openapi_views"
    settings.IDEMPOTENCY_MIDDLEWARE_PATHS = [r"^/override/", r"^/wrapped/"]

    missing = api_client.post(path, {"amount": 5}, format="json")
    first = api_client.post(path, {"amount": 5}, format="json", headers=KEY)
    second = api_client.post(path, {"amount": 5}, format="json", headers=KEY)

    assert_problem(missing, 400, "idempotency_key_missing")
    assert first.status_code == 201, first.content
    assert second["Idempotent-Replayed"] == "true"
    assert second.content == first.content
    assert runs == [path]
    assert claims == ["atomic"]  # the view's claim only: the middleware made none


@pytest.mark.skipif(not HAS_DRF, reason="Django REST Framework is not installed")
def test_an_api_view_under_a_decorator_without_wraps_is_claimed_once(
    api_client, runs, claims, settings
):
    settings.ROOT_URLCONF = "tests.openapi_views"
    settings.IDEMPOTENCY_MIDDLEWARE_PATHS = [r"^/wrapped/"]

    first = api_client.post("/wrapped/api/", {"amount": 5}, format="json", headers=KEY)
    second = api_client.post("/wrapped/api/", {"amount": 5}, format="json", headers=KEY)

    assert first.status_code == 201, first.content
    assert second["Idempotent-Replayed"] == "true"
    assert runs == ["/wrapped/api/"]
    assert claims == ["atomic"]


# -- Finding a view's own protection -----------------------------------------------------------


def test_view_options_finds_idempotent_below_other_decorators():
    from django.views.decorators.csrf import csrf_exempt

    from django_idempotency.decorators import idempotent

    @csrf_exempt
    @idempotent(required=True)
    def view(request): ...  # pragma: no cover - never called

    options = view_options(view, "POST")

    assert options is not None
    assert options.required is True
    assert view_options(views.plain_charge, "POST") is None
    assert view_options(views.plain_async_charge, "POST") is None
    assert view_options(views.async_charge, "POST") is not None


@pytest.mark.skipif(not HAS_DRF, reason="Django REST Framework is not installed")
def test_a_mixin_view_protects_itself_and_no_options_are_copied_from_its_class():
    from django_idempotency.middleware import protects_itself
    from tests.openapi_views import RequiredByOverrideAPIView, RequiredByOverrideViewSet

    view = RequiredByOverrideAPIView.as_view()
    viewset = RequiredByOverrideViewSet.as_view({"post": "create", "delete": "destroy"})

    for protected in (view, viewset):
        # Whatever the methods, the view's own get_idempotency_options() decides per request.
        assert protects_itself(protected, "POST")
        assert protects_itself(protected, "DELETE")
        # Only an instance knows its options: none are made up from the class attributes.
        assert view_options(protected, "POST") is None


def test_view_options_of_a_django_class_based_view():
    from django.views import View

    assert view_options(View.as_view(), "POST") is None


# -- Checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("^/api/", "must be a list or tuple of regular expressions, not '^/api/' (str)"),
        ([r"^/api/", 3], "must be a list or tuple of regular expressions"),
        ([r"^/api/(", "x"], "holds '^/api/(', which is not a regular expression"),
    ],
)
def test_e018_the_paths_must_be_regular_expressions(settings, value, words):
    settings.IDEMPOTENCY_MIDDLEWARE_PATHS = value

    [message] = check_settings()

    assert message.id == "django_idempotency.E018"
    assert message.msg.startswith("IDEMPOTENCY_MIDDLEWARE_PATHS ")
    assert words in message.msg


def test_the_middleware_after_authentication_with_paths_passes():
    assert check_middleware() == []


def test_w006_the_middleware_without_paths(settings):
    settings.IDEMPOTENCY_MIDDLEWARE_PATHS = ()

    [message] = check_middleware()

    assert message.id == "django_idempotency.W006"


def test_w007_the_middleware_before_authentication(settings):
    settings.MIDDLEWARE = [MIDDLEWARE_PATH, *settings.MIDDLEWARE[:-1]]

    [message] = check_middleware()

    assert message.id == "django_idempotency.W007"
    assert "AuthenticationMiddleware" in message.msg


def test_w008_paths_without_the_middleware(settings):
    settings.MIDDLEWARE = settings.MIDDLEWARE[:-1]

    [message] = check_middleware()

    assert message.id == "django_idempotency.W008"


def test_no_middleware_and_no_paths_passes(settings):
    settings.MIDDLEWARE = settings.MIDDLEWARE[:-1]
    settings.IDEMPOTENCY_MIDDLEWARE_PATHS = []

    assert check_middleware() == []


def test_changed_paths_are_compiled_again(client, runs):
    with override_settings(IDEMPOTENCY_MIDDLEWARE_PATHS=[r"^/nothing/"]):
        _post(client, "/plain/")
        _post(client, "/plain/")

    assert len(runs) == 2


def test_a_bad_setting_stops_the_server_when_it_loads_the_middleware(settings):
    # gunicorn and uvicorn run no system checks; they load the middleware at startup.
    from django.core.exceptions import ImproperlyConfigured
    from django.core.handlers.wsgi import WSGIHandler

    settings.MIDDLEWARE = [
        *settings.MIDDLEWARE,
        "django_idempotency.middleware.IdempotencyMiddleware",
    ]
    settings.IDEMPOTENCY_MIDDLEWARE_PATHS = [r"^/"]
    settings.IDEMPOTENCY_TTL = 3600

    with pytest.raises(ImproperlyConfigured, match=r"\(django_idempotency\.E004\) IDEMPOTENCY_TTL"):
        WSGIHandler()
