"""The request contract through ``IdempotentMixin`` on DRF viewsets and ``APIView``s.

Every test runs with each store (the ``store`` fixture): the database store and the cache
store, which has no atomic mode, so there every endpoint runs in the lease mode.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import RequestFactory
from django.utils.http import parse_http_date

pytest.importorskip("rest_framework")

from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory
from rest_framework.views import APIView
from rest_framework.viewsets import ModelViewSet

from django_idempotency.core import request_fingerprint
from django_idempotency.rest_framework import IdempotentMixin
from tests.assertions import assert_problem
from tests.models import Charge
from tests.store_harness import STORED, database_only
from tests.views import VIEW_DATE

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("store")]

KEY = "order-1"
BODY = {"amount": 5}
JSON = "application/json"


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    url: str
    #: Whether the view runs in the transaction that stores its response, with a store that
    #: has the atomic mode.
    atomic: bool = True

    def fingerprint(self, data=None) -> str:
        """The default fingerprint of the request that ``send()`` makes."""
        body = json.dumps(BODY if data is None else data)
        return request_fingerprint(RequestFactory().generic(self.method, self.url, body, JSON))


@pytest.fixture
def existing_charge(db):
    return Charge.objects.create(amount=1, note="existing")


def _endpoint(name: str, charge: Charge) -> Endpoint:
    return {
        "viewset create": Endpoint(name, "post", "/viewset/charges/"),
        "viewset partial_update": Endpoint(name, "patch", f"/viewset/charges/{charge.pk}/"),
        "APIView": Endpoint(name, "post", "/apiview/"),
        "APIView lease mode": Endpoint(name, "post", "/apiview/lease/", atomic=False),
        "APIView optional": Endpoint(name, "post", "/apiview/optional/"),
    }[name]


KEYED = ["viewset create", "viewset partial_update", "APIView", "APIView lease mode"]


@pytest.fixture(params=KEYED)
def endpoint(request, existing_charge) -> Endpoint:
    return _endpoint(request.param, existing_charge)


def send(client, endpoint: Endpoint, data=None, *, key=KEY, suffix="", **headers):
    if key is not None:
        headers["Idempotency-Key"] = key
    data = BODY if data is None else data
    method = getattr(client, endpoint.method)
    return method(endpoint.url + suffix, data, content_type=JSON, headers=headers)


def writes_kept(endpoint: Endpoint, store, attempts: int) -> int:
    """What ``charges_written()`` counts after ``attempts`` runs that wrote, then failed."""
    if endpoint.atomic and store.supports_atomic:
        return 0  # rolled back with the claim
    return 1 if endpoint.method == "patch" else attempts  # edits of one charge count once


def kept_for(record, ttl: timedelta) -> bool:
    """Whether a just-completed key lives for ``ttl`` from now, on the store's clock."""
    return ttl - timedelta(seconds=30) < record.expires_in <= ttl


def expires_in(response) -> float:
    """Seconds from now until the ``Idempotency-Key-Expires`` the response carries."""
    return parse_http_date(response["Idempotency-Key-Expires"]) - time.time()


def charges_written() -> int:
    """Charges other than the ``existing_charge`` fixture's, counting its edits as one."""
    return (
        Charge.objects.exclude(note="existing").count()
        + Charge.objects.filter(note="existing", amount__gt=1).count()
    )


# -- Keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["viewset create", "viewset partial_update", "APIView optional"])
def test_request_without_key_gets_the_views_own_answer_and_nothing_is_stored(
    client, existing_charge, runs, store, name
):
    endpoint = _endpoint(name, existing_charge)

    first = send(client, endpoint, key=None)
    second = send(client, endpoint, key=None)

    assert first.status_code in (200, 201)
    assert not second.has_header("Idempotent-Replayed")
    assert len(runs) == 2
    assert store.count() == 0


@pytest.mark.parametrize("name", ["APIView", "APIView lease mode"])
def test_request_without_key_is_refused_when_the_view_requires_one(
    client, existing_charge, runs, store, name
):
    response = send(client, _endpoint(name, existing_charge), key=None)

    assert_problem(response, 400, "idempotency_key_missing")
    assert runs == []
    assert store.count() == 0


def test_required_setting_applies_to_views_that_do_not_say(client, runs, settings):
    settings.IDEMPOTENCY_REQUIRED = True

    response = send(client, Endpoint("create", "post", "/viewset/charges/"), key=None)

    assert_problem(response, 400, "idempotency_key_missing")
    assert runs == []


@pytest.mark.parametrize("raw_key", ["", "k" * 256, "clé", "a, b", '"abc'])
def test_malformed_key_is_refused_and_the_view_does_not_run(client, endpoint, runs, store, raw_key):
    response = send(client, endpoint, key=raw_key)

    assert_problem(response, 400, "idempotency_key_invalid")
    assert runs == []
    assert store.count() == 0


def test_errors_of_this_layer_are_problem_json_whatever_the_client_accepts(client, endpoint):
    response = send(client, endpoint, key="", Accept="text/html")

    assert_problem(response, 400, "idempotency_key_invalid")


# -- New key and replay -------------------------------------------------------------------------


def test_retry_gets_the_first_response_byte_for_byte_without_running_the_view(
    client, endpoint, runs
):
    first = send(client, endpoint)
    retry = send(client, endpoint)

    assert first.status_code in (200, 201)
    assert not first.has_header("Idempotent-Replayed")
    assert retry.status_code == first.status_code
    assert retry.content == first.content
    never_replayed = {"date", "keep-alive", "idempotency-key-expires"}  # sent afresh
    expected = {k.lower(): v for k, v in first.headers.items() if k.lower() not in never_replayed}
    replayed = {k.lower(): v for k, v in retry.headers.items() if k.lower() not in never_replayed}
    assert replayed == {**expected, "idempotent-replayed": "true"}
    assert first["ETag"] == retry["ETag"]
    assert len(runs) == 1
    assert charges_written() == 1


def test_replay_never_carries_the_first_callers_cookie_date_or_hop_by_hop_header(client, endpoint):
    first = send(client, endpoint)
    retry = send(client, endpoint)

    assert first.cookies["session_hint"].value == "first-caller"
    assert (first["Date"], first["Keep-Alive"]) == (VIEW_DATE, "timeout=5")
    assert "session_hint" not in retry.cookies
    assert retry.get("Date") != VIEW_DATE
    assert not retry.has_header("Keep-Alive")


def test_new_key_stores_the_rendered_response(client, endpoint, store):
    response = send(client, endpoint)

    assert store.count() == 1
    record = store.get(KEY)
    assert record.state == "completed"
    assert (record.method, record.path) == (endpoint.method.upper(), endpoint.url)
    assert record.fingerprint == endpoint.fingerprint()
    assert record.status == response.status_code
    assert record.body == response.content


def test_first_answer_and_replay_carry_the_keys_expiry_which_is_never_stored(
    client, endpoint, store
):
    first = send(client, endpoint)
    store.set_expiry(KEY, timedelta(minutes=7))
    retry = send(client, endpoint)

    assert 86_400 - 2 <= expires_in(first) <= 86_400 + 1  # HTTP-dates are whole seconds
    assert retry["Idempotent-Replayed"] == "true"
    assert 420 - 2 <= expires_in(retry) <= 420 + 1
    assert "idempotency-key-expires" not in {name.lower() for name, _ in store.get(KEY).headers}


def test_expiry_is_sent_only_with_answers_that_are_stored(client, endpoint, runs, store):
    send(client, endpoint)
    store.plant(
        "busy",
        method=endpoint.method.upper(),
        path=endpoint.url,
        fingerprint=endpoint.fingerprint(),
    )

    answers = [
        send(client, endpoint, {"amount": 6}),  # 422 mismatch
        send(client, endpoint, key="busy"),  # 409 in progress
        send(client, endpoint, key="server-error", suffix="?behaviour=500"),  # not stored
    ]

    assert [answer.status_code for answer in answers] == [422, 409, 500]
    assert not any(answer.has_header("Idempotency-Key-Expires") for answer in answers)


@pytest.mark.parametrize("change", ["body", "query string"])
def test_same_key_for_a_different_request_is_refused_and_the_key_kept(
    client, endpoint, runs, store, change
):
    send(client, endpoint)
    before = store.snapshot()

    if change == "body":
        response = send(client, endpoint, {"amount": 6})
    else:
        response = send(client, endpoint, suffix="?note=other")

    assert_problem(response, 422, "idempotency_key_mismatch")
    assert len(runs) == 1
    assert store.snapshot() == before


def test_same_key_on_another_endpoint_is_refused(client, existing_charge, runs):
    send(client, _endpoint("viewset create", existing_charge))

    response = send(client, _endpoint("viewset partial_update", existing_charge))

    assert_problem(response, 422, "idempotency_key_mismatch")
    assert len(runs) == 1


def test_key_held_by_a_live_request_answers_409_with_retry_after(client, endpoint, runs, store):
    store.plant(
        KEY, method=endpoint.method.upper(), path=endpoint.url, fingerprint=endpoint.fingerprint()
    )

    response = send(client, endpoint)

    assert_problem(response, 409, "idempotency_key_in_progress")
    assert 1 <= int(response["Retry-After"]) <= 30
    assert runs == []


def test_expired_key_is_treated_as_new_and_its_record_replaced(client, endpoint, runs, store):
    store.plant(KEY, fingerprint="0" * 64, response=STORED, expired=True)

    response = send(client, endpoint)

    assert response.status_code in (200, 201)
    assert len(runs) == 1
    assert store.count() == 1
    record = store.get(KEY)
    assert record.body == response.content
    assert record.path == endpoint.url
    assert kept_for(record, timedelta(hours=24))


def test_unreachable_store_answers_503_and_the_view_does_not_run(client, endpoint, runs, store):
    store.make_unreachable()

    response = send(client, endpoint)

    assert_problem(response, 503, "idempotency_store_unavailable")
    assert int(response["Retry-After"]) >= 1
    assert runs == []
    assert charges_written() == 0


# -- The storing rule -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_validation_error_is_not_stored_and_a_corrected_retry_reuses_the_key(
    client, endpoint, runs, store
):
    rejected = send(client, endpoint, {"amount": -1})
    assert rejected.status_code == 400
    assert "amount" in rejected.json()
    assert store.count() == 0

    corrected = send(client, endpoint, {"amount": 7})
    retry = send(client, endpoint, {"amount": 7})

    assert corrected.status_code in (200, 201)
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == corrected.content
    assert len(runs) == 2


@pytest.mark.django_db(transaction=True)
def test_not_found_raised_by_the_view_is_not_stored_and_leaves_the_key_free(
    client, endpoint, runs, store
):
    first = send(client, endpoint, suffix="?behaviour=notfound")
    second = send(client, endpoint, suffix="?behaviour=notfound")

    assert first.status_code == second.status_code == 404
    assert not second.has_header("Idempotent-Replayed")
    assert len(runs) == 2
    assert store.count() == 0
    # The view wrote before raising: the atomic mode rolls that back.
    assert charges_written() == writes_kept(endpoint, store, 2)


@pytest.mark.django_db(transaction=True)
def test_partial_update_of_a_missing_object_is_not_stored(client, runs, store):
    missing = Endpoint("partial_update", "patch", "/viewset/charges/999999/")

    assert send(client, missing).status_code == 404
    assert store.count() == 0


@pytest.mark.django_db(transaction=True)
def test_unexpected_exception_stores_nothing_and_leaves_the_key_free(client, endpoint, runs, store):
    with pytest.raises(RuntimeError, match="the view failed"):
        send(client, endpoint, suffix="?behaviour=raise")

    assert store.count() == 0
    assert charges_written() == writes_kept(endpoint, store, 1)
    assert send(client, endpoint).status_code in (200, 201)
    assert len(runs) == 2


@pytest.mark.django_db(transaction=True)
def test_returned_server_error_is_not_stored_and_leaves_the_key_free(client, endpoint, runs, store):
    first = send(client, endpoint, suffix="?behaviour=500")
    retry = send(client, endpoint, suffix="?behaviour=500")

    assert first.status_code == retry.status_code == 500
    assert not retry.has_header("Idempotent-Replayed")
    assert len(runs) == 2
    assert store.count() == 0
    assert charges_written() == writes_kept(endpoint, store, 2)


@pytest.mark.django_db(transaction=True)
def test_server_error_is_stored_when_the_setting_says_so(client, endpoint, runs, settings):
    settings.IDEMPOTENCY_STORE_SERVER_ERRORS = True

    first = send(client, endpoint, suffix="?behaviour=500")
    retry = send(client, endpoint, suffix="?behaviour=500")

    assert retry["Idempotent-Replayed"] == "true"
    assert (retry.status_code, retry.content) == (500, first.content)
    assert len(runs) == 1


def test_returned_client_error_is_stored_and_replayed(client, endpoint, runs):
    first = send(client, endpoint, suffix="?behaviour=400")
    retry = send(client, endpoint, suffix="?behaviour=400")

    assert first.status_code == 400
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert len(runs) == 1


@pytest.mark.parametrize("behaviour", ["stream", "large"])
def test_response_that_cannot_be_stored_is_never_rerun_nor_replayed(
    client, endpoint, runs, store, settings, behaviour
):
    settings.IDEMPOTENCY_MAX_RESPONSE_SIZE = 1000

    first = send(client, endpoint, suffix=f"?behaviour={behaviour}")
    retry = send(client, endpoint, suffix=f"?behaviour={behaviour}")

    body = assert_problem(retry, 409, "idempotency_response_not_stored")
    assert body["original_status"] == first.status_code
    assert len(runs) == 1
    record = store.get(KEY)
    assert (record.state, record.status, record.body) == ("completed", first.status_code, None)


# -- Authentication and scope ---------------------------------------------------------------


def test_key_is_scoped_to_the_user_drf_authenticated(
    client, endpoint, runs, store, alice, bob, basic_auth
):
    alice_first = send(client, endpoint, **basic_auth(alice))
    bob_first = send(client, endpoint, **basic_auth(bob))
    alice_retry = send(client, endpoint, **basic_auth(alice))
    bob_retry = send(client, endpoint, **basic_auth(bob))

    assert not bob_first.has_header("Idempotent-Replayed")
    assert alice_retry.content == alice_first.content
    assert bob_retry.content == bob_first.content
    assert alice_retry["Idempotent-Replayed"] == bob_retry["Idempotent-Replayed"] == "true"
    assert len(runs) == 2
    assert store.count() == 2
    assert store.get(KEY, scope=f"user:{alice.pk}").body == alice_first.content
    assert store.get(KEY, scope=f"user:{bob.pk}").body == bob_first.content


def test_idempotent_under_api_view_is_scoped_to_the_user_drf_authenticated(
    client, runs, store, alice, bob, basic_auth
):
    endpoint = Endpoint("api_view", "post", "/api/")

    alice_first = send(client, endpoint, **basic_auth(alice))
    bob_first = send(client, endpoint, **basic_auth(bob))
    alice_retry = send(client, endpoint, **basic_auth(alice))

    assert not bob_first.has_header("Idempotent-Replayed")
    assert alice_retry.content == alice_first.content
    assert len(runs) == 2
    assert store.count() == 2
    assert store.get(KEY, scope=f"user:{alice.pk}").body == alice_first.content
    assert store.get(KEY, scope=f"user:{bob.pk}").body == bob_first.content


def test_anonymous_caller_never_gets_a_users_response(client, endpoint, runs, alice, basic_auth):
    send(client, endpoint, **basic_auth(alice))
    anonymous = send(client, endpoint)

    assert not anonymous.has_header("Idempotent-Replayed")
    assert len(runs) == 2


def test_session_client_is_scoped_to_its_user(api_client, alice, runs, store):
    first = api_client.post(
        "/viewset/charges/", BODY, format="json", headers={"Idempotency-Key": KEY}
    )
    retry = api_client.post(
        "/viewset/charges/", BODY, format="json", headers={"Idempotency-Key": KEY}
    )

    assert first.status_code == 201
    assert retry["Idempotent-Replayed"] == "true"
    assert store.count() == 1
    assert store.get(KEY, scope=f"user:{alice.pk}").body == first.content


def test_request_refused_by_a_permission_claims_nothing(db, runs, store):
    class Private(IdempotentMixin, APIView):
        permission_classes = [IsAuthenticated]

        def post(self, request):
            runs.append("private")
            return Response(status=201)

    request = APIRequestFactory().post("/private/", BODY, format="json", HTTP_IDEMPOTENCY_KEY=KEY)
    response = Private.as_view()(request)

    assert response.status_code in (401, 403)
    assert runs == []
    assert store.count() == 0


# -- Per-view attributes and class order ------------------------------------------------------


def _call(view_class, method: str, key: str = KEY):
    request = getattr(APIRequestFactory(), method)(
        "/attributes/", BODY, format="json", HTTP_IDEMPOTENCY_KEY=key
    )
    return view_class.as_view()(request)


def test_ttl_attribute_sets_how_long_the_response_is_kept(db, store):
    class ShortLived(IdempotentMixin, APIView):
        idempotency_ttl = timedelta(minutes=10)

        def post(self, request):
            return Response({"ok": True}, status=201)

    _call(ShortLived, "post")

    assert kept_for(store.get(KEY), timedelta(minutes=10))


def test_methods_attribute_chooses_the_covered_methods(db, runs):
    class PutOnly(IdempotentMixin, APIView):
        idempotency_methods = ["put"]

        def post(self, request):
            runs.append("post")
            return Response({"n": len(runs)}, status=201)

        put = post

    _call(PutOnly, "post")
    post_again = _call(PutOnly, "post")
    _call(PutOnly, "put", key="put-key")
    put_again = _call(PutOnly, "put", key="put-key")

    assert not post_again.has_header("Idempotent-Replayed")
    assert put_again["Idempotent-Replayed"] == "true"
    assert runs == ["post", "post", "post"]


def test_required_attribute_refuses_requests_without_key(db, runs):
    class Required(IdempotentMixin, APIView):
        idempotency_required = True

        def post(self, request):
            runs.append("post")
            return Response(status=201)

    request = APIRequestFactory().post("/attributes/", BODY, format="json")
    response = Required.as_view()(request)

    assert_problem(response, 400, "idempotency_key_missing")
    assert runs == []


def test_stored_statuses_attribute_chooses_the_stored_statuses(db, runs, store):
    class Conflicts(IdempotentMixin, APIView):
        idempotency_stored_statuses = ("2xx", 409)

        def post(self, request):
            runs.append("post")
            return Response({"n": len(runs)}, status=int(request.query_params["status"]))

    def call(status):
        request = APIRequestFactory().post(
            f"/attributes/?status={status}", BODY, format="json", HTTP_IDEMPOTENCY_KEY=KEY
        )
        return Conflicts.as_view()(request)

    # A returned 400 is stored by default; not with this view's list: the key is freed.
    assert [call(400).status_code, call(400).status_code] == [400, 400]
    assert store.count() == 0
    first, retry = call(409), call(409)

    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert len(runs) == 3
    assert store.get(KEY).status == 409


@pytest.mark.django_db(transaction=True)
def test_status_left_out_of_the_stored_statuses_setting_frees_the_key(
    client, endpoint, runs, store, settings
):
    settings.IDEMPOTENCY_STORED_STATUSES = ("2xx",)

    first = send(client, endpoint, suffix="?behaviour=400")
    retry = send(client, endpoint, suffix="?behaviour=400")

    assert first.status_code == retry.status_code == 400
    assert not retry.has_header("Idempotent-Replayed")
    assert len(runs) == 2
    assert store.count() == 0
    assert charges_written() == writes_kept(endpoint, store, 2)


@pytest.mark.parametrize("base", [APIView, ModelViewSet], ids=["APIView", "ModelViewSet"])
def test_mixin_listed_after_the_drf_class_is_refused_with_the_right_order(base):
    with pytest.raises(TypeError) as excinfo:
        type("OrderView", (base, IdempotentMixin), {})

    message = str(excinfo.value)
    assert "list IdempotentMixin before" in message
    assert f"class OrderView(IdempotentMixin, {base.__name__})" in message


def test_mixin_listed_first_is_accepted():
    view = type("OrderView", (IdempotentMixin, ModelViewSet), {})

    assert view.__mro__.index(IdempotentMixin) < view.__mro__.index(ModelViewSet)


# The atomic mode, and the view's writes rolling back with it, exist in the database store only.
@database_only
@pytest.mark.django_db(transaction=True)
def test_mixin_keeps_its_promises_under_atomic_requests(
    client, existing_charge, runs, store, monkeypatch
):
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    endpoint = _endpoint("viewset create", existing_charge)

    rejected = send(client, endpoint, {"amount": -1})
    server_error = send(client, endpoint, suffix="?behaviour=500")
    first = send(client, endpoint)
    retry = send(client, endpoint)

    assert (rejected.status_code, server_error.status_code) == (400, 500)
    assert first.status_code == 201
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert len(runs) == 3
    assert charges_written() == 1
    assert store.count() == 1


# -- Options are validated when the view is defined -------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("idempotency_methods", "POST", "idempotency_methods must be a list or tuple of HTTP"),
        ("idempotency_ttl", 3600, "idempotency_ttl must be a positive timedelta, not 3600"),
        ("idempotency_wait", 2, "idempotency_wait must be a datetime.timedelta of zero or more"),
        ("idempotency_required", "yes", "idempotency_required must be True or False"),
        ("idempotency_atomic", 0, "idempotency_atomic must be True or False, not 0 (int)"),
        (
            "idempotency_stored_statuses",
            "2xx",
            "idempotency_stored_statuses must be None, or a list or tuple of status classes",
        ),
        (
            "idempotency_stored_statuses",
            [],
            "idempotency_stored_statuses must name at least one status class or code",
        ),
    ],
)
def test_a_wrong_attribute_is_refused_when_the_class_is_defined(attribute, value, message):
    # idempotency_methods = "POST" used to cover the methods P, O, S and T: no protection.
    with pytest.raises(ImproperlyConfigured) as caught:
        type("OrderViewSet", (IdempotentMixin, ModelViewSet), {attribute: value})

    assert str(caught.value).startswith(f"{__name__}.OrderViewSet: ")
    assert message in str(caught.value)


def test_a_wrong_option_given_to_as_view_is_refused_there():
    class OrderView(IdempotentMixin, APIView):
        def post(self, request):
            return Response(status=201)

    with pytest.raises(ImproperlyConfigured, match=r"OrderView: idempotency_ttl must be"):
        OrderView.as_view(idempotency_ttl=3600)
    assert OrderView.as_view(idempotency_ttl=timedelta(hours=1)) is not None


def test_a_viewset_as_view_with_actions_still_validates_and_routes():
    class OrderViewSet(IdempotentMixin, ModelViewSet):
        queryset = Charge.objects.all()

    with pytest.raises(ImproperlyConfigured, match=r"idempotency_methods must be"):
        OrderViewSet.as_view({"post": "create"}, idempotency_methods="POST")
    assert OrderViewSet.as_view({"post": "create"}) is not None


def test_an_override_returning_wrong_options_names_the_view_and_the_option():
    class OrderView(IdempotentMixin, APIView):
        def get_idempotency_options(self):
            self.idempotency_wait = 2  # chosen per request, say
            return super().get_idempotency_options()

        def post(self, request):
            return Response(status=201)

    request = APIRequestFactory().post("/", {}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    with pytest.raises(ImproperlyConfigured, match=r"OrderView: idempotency_wait must be"):
        OrderView.as_view()(request)
