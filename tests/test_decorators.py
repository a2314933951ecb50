"""The request contract (docs/contract.md) through ``@idempotent`` on function views.

Every row runs against four kinds of view: ``sync`` (the atomic mode), ``lease``
(``@idempotent(atomic=False)``), ``async`` (always the lease mode) and ``api`` (a sync view under
DRF's ``@api_view``, when DRF is installed), and with each store (the ``store`` fixture): the
database store and the cache store, which has no atomic mode, so there every kind runs in the
lease mode. The views are in ``tests/views.py``.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.http import HttpResponse
from django.test import Client, RequestFactory
from django.test.client import encode_multipart
from django.utils.http import parse_http_date

from django_idempotency.core import request_fingerprint
from django_idempotency.decorators import idempotent
from tests.assertions import assert_problem
from tests.factories import UserFactory
from tests.models import Charge
from tests.store_harness import STORED, cache_only, database_only
from tests.views import HAS_DRF, VIEW_DATE

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("store")]

BASE_URLS = {"sync": "/sync/", "lease": "/sync/lease/", "async": "/async/"}
if HAS_DRF:
    BASE_URLS["api"] = "/api/"
#: Kinds whose view runs inside the transaction that stores its response (with a store that
#: has the atomic mode).
ATOMIC_KINDS = {"sync", "api"}

KEY = "order-1"
BODY = {"amount": 5}
JSON = "application/json"


@pytest.fixture(params=list(BASE_URLS))
def kind(request) -> str:
    return request.param


@pytest.fixture
def url(kind) -> str:
    return BASE_URLS[kind]


def send(client, url, data=None, *, key=KEY, method="post", content_type=JSON, **headers):
    """Send a request with ``Idempotency-Key: key`` (none when ``key`` is ``None``)."""
    if key is not None:
        headers["Idempotency-Key"] = key
    data = BODY if data is None else data
    return getattr(client, method)(url, data, content_type=content_type, headers=headers)


def atomic_mode(kind, store) -> bool:
    """Whether the view of ``kind`` runs in the transaction that stores its response."""
    return kind in ATOMIC_KINDS and store.supports_atomic


def assert_kept_for(record, ttl: timedelta) -> None:
    """Assert that a just-completed key lives for ``ttl`` from now, on the store's clock."""
    assert ttl - timedelta(seconds=30) < record.expires_in <= ttl


def fingerprint_of(url, data=None, *, method="POST", content_type=JSON) -> str:
    """The default fingerprint of the request that ``send()`` makes."""
    body = json.dumps(BODY if data is None else data)
    return request_fingerprint(RequestFactory().generic(method, url, body, content_type))


def expires_in(response) -> float:
    """Seconds from now until the ``Idempotency-Key-Expires`` the response carries."""
    return parse_http_date(response["Idempotency-Key-Expires"]) - time.time()


#: Headers a view sets that are never stored nor replayed (cookies are not in ``headers``);
#: ``Idempotency-Key-Expires`` is sent afresh with each answer.
NEVER_REPLAYED = {"date", "keep-alive", "idempotency-key-expires"}


def replayable(headers) -> dict[str, str]:
    return {
        name.lower(): value for name, value in headers.items() if name.lower() not in NEVER_REPLAYED
    }


# -- No key ---------------------------------------------------------------------------------


def test_request_without_key_gets_the_views_own_answer_and_nothing_is_stored(
    client, url, runs, store
):
    first = send(client, url, key=None)
    second = send(client, url, key=None)

    assert first.status_code == second.status_code == 201
    assert first.json()["id"] != second.json()["id"]
    assert not second.has_header("Idempotent-Replayed")
    assert len(runs) == 2
    assert store.count() == 0


def test_request_without_key_is_refused_when_the_view_requires_one(client, url, runs, store):
    response = send(client, f"{url}required/", key=None)

    assert_problem(response, 400, "idempotency_key_missing")
    assert runs == []
    assert store.count() == 0


def test_required_setting_makes_a_missing_key_an_error(client, url, runs, settings):
    settings.IDEMPOTENCY_REQUIRED = True

    response = send(client, url, key=None)

    assert_problem(response, 400, "idempotency_key_missing")
    assert runs == []


def test_view_that_opts_out_of_a_required_key_wins_over_the_setting(client, url, runs, settings):
    settings.IDEMPOTENCY_REQUIRED = True

    response = send(client, f"{url}optional/", key=None)

    assert response.status_code == 201
    assert len(runs) == 1


# -- The key --------------------------------------------------------------------------------

MALFORMED_KEYS = {
    "empty": "",
    "whitespace only": "   ",
    "256 characters": "k" * 256,
    "256 characters quoted": '"' + "k" * 256 + '"',
    "control character": "abc\x01def",
    "tab inside": "abc\tdef",
    "delete character": "abc\x7f",
    "non-ASCII": "clé",
    "two bare values": "a, b",
    "two quoted values": '"a", "b"',
    "unterminated quote": '"abc',
    "string with parameters": '"abc";p=1',
    "empty quoted string": '""',
    "bad escape in quoted string": '"a\\b"',
}


@pytest.mark.parametrize("raw_key", MALFORMED_KEYS.values(), ids=MALFORMED_KEYS.keys())
def test_malformed_key_is_refused_and_the_view_does_not_run(client, url, runs, store, raw_key):
    response = send(client, url, key=raw_key)

    assert_problem(response, 400, "idempotency_key_invalid")
    assert runs == []
    assert store.count() == 0
    assert Charge.objects.count() == 0


def test_key_of_255_characters_is_accepted_and_replayed(client, url, runs, store):
    key = "k" * 255

    first = send(client, url, key=key)
    second = send(client, url, key=key)

    assert first.status_code == 201
    assert second.content == first.content
    assert second["Idempotent-Replayed"] == "true"
    assert store.count() == 1
    assert store.get(key) is not None
    assert len(runs) == 1


@pytest.mark.parametrize(
    ("first_key", "retry_key"),
    [("abc", '"abc"'), ('"abc"', "abc"), (" abc\t", "abc"), ('"a\\"b"', 'a"b')],
    ids=["bare then quoted", "quoted then bare", "padded then bare", "escaped quote"],
)
def test_quoted_and_bare_forms_name_the_same_key(client, url, runs, first_key, retry_key):
    first = send(client, url, key=first_key)
    retry = send(client, url, key=retry_key)

    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert len(runs) == 1


@pytest.mark.parametrize(
    ("first_key", "other_key"),
    [("order-A", "order-a"), ('"order "', "order")],
    ids=["letter case", "trailing space"],
)
def test_keys_that_differ_only_in_case_or_trailing_space_are_different_keys(
    client, url, runs, store, first_key, other_key
):
    send(client, url, key=first_key)
    other = send(client, url, {"amount": 6}, key=other_key)

    assert other.status_code == 201, other.content
    assert not other.has_header("Idempotent-Replayed")
    assert len(runs) == 2
    assert store.count() == 2


def test_header_setting_names_the_header_that_carries_the_key(client, url, runs, store, settings):
    settings.IDEMPOTENCY_HEADER = "X-Request-Key"

    first = send(client, url, key=None, **{"X-Request-Key": KEY})
    retry = send(client, url, key=None, **{"X-Request-Key": KEY})
    other_header = send(client, url, key=KEY)

    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert other_header.status_code == 201
    assert not other_header.has_header("Idempotent-Replayed")
    assert len(runs) == 2
    assert store.count() == 1


def test_errors_about_the_header_name_the_configured_header(client, url, runs, settings):
    settings.IDEMPOTENCY_HEADER = "X-Request-Key"

    missing = send(client, f"{url}required/", key=None)
    invalid = send(client, url, key=None, **{"X-Request-Key": ""})

    assert json.loads(missing.content)["detail"].startswith(
        "This endpoint requires an X-Request-Key header."
    )
    assert json.loads(invalid.content)["detail"].startswith("The X-Request-Key header must be")
    assert runs == []


# -- New key and replay ---------------------------------------------------------------------


def test_new_key_runs_the_view_once_and_stores_its_response(client, url, runs, store):
    response = send(client, url)

    assert response.status_code == 201
    assert not response.has_header("Idempotent-Replayed")
    assert len(runs) == 1
    assert store.count() == 1
    record = store.get(KEY, scope="anonymous")
    assert (record.method, record.path) == ("POST", url)
    assert record.fingerprint == fingerprint_of(url)
    assert record.state == "completed"
    assert record.status == 201
    assert record.body == response.content


def test_retry_gets_the_first_response_byte_for_byte_without_running_the_view(client, url, runs):
    first = send(client, url)
    retry = send(client, url)

    assert retry.status_code == first.status_code == 201
    assert retry.content == first.content
    for header in ("Content-Type", "Location", "ETag", "X-Custom"):
        assert retry[header] == first[header]
    assert retry["Idempotent-Replayed"] == "true"
    assert len(runs) == 1
    assert Charge.objects.count() == 1


def test_replay_never_carries_the_first_callers_cookie_date_or_hop_by_hop_header(
    client, url, store
):
    first = send(client, url)
    retry = send(client, url)

    assert first.cookies["session_hint"].value == "first-caller"
    assert (first["Date"], first["Keep-Alive"]) == (VIEW_DATE, "timeout=5")
    assert "session_hint" not in retry.cookies
    assert retry.get("Date") != VIEW_DATE
    assert not retry.has_header("Keep-Alive")
    stored_names = {name.lower() for name, _ in store.get(KEY).headers}
    assert not stored_names & {"set-cookie", "date", "keep-alive"}


def test_replay_has_exactly_the_first_responses_headers_plus_the_replayed_mark(client, url):
    first = send(client, url)
    retry = send(client, url)

    assert replayable(retry.headers) == {
        **replayable(first.headers),
        "idempotent-replayed": "true",
    }


@pytest.mark.parametrize("kind", sorted(set(BASE_URLS) - {"api"}))
def test_lazily_rendered_template_response_is_replayed_as_rendered(client, url, runs):
    first = send(client, f"{url}?behaviour=template")
    retry = send(client, f"{url}?behaviour=template")

    assert first.content.startswith(b"<p>Charge ")
    assert retry["Idempotent-Replayed"] == "true"
    assert (retry.status_code, retry.content) == (201, first.content)
    assert retry["Content-Type"] == first["Content-Type"]
    assert len(runs) == 1


def test_async_client_gets_the_same_replay(async_client, runs):
    post = async_to_sync(async_client.post)
    first = post("/async/", BODY, content_type=JSON, headers={"Idempotency-Key": KEY})
    retry = post("/async/", BODY, content_type=JSON, headers={"Idempotency-Key": KEY})
    other = post("/async/", {"amount": 6}, content_type=JSON, headers={"Idempotency-Key": KEY})

    assert first.status_code == 201
    assert retry.content == first.content
    assert retry["Idempotent-Replayed"] == "true"
    assert_problem(other, 422, "idempotency_key_mismatch")
    assert len(runs) == 1


# -- Same key, different request --------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"data": {"amount": 6}},
        {"suffix": "?note=other"},
        {"method": "patch"},
        {"suffix": "again/"},
    ],
    ids=["body", "query string", "method", "path"],
)
def test_same_key_for_a_different_request_is_refused_and_the_key_kept(
    client, url, runs, store, change
):
    first = send(client, url)
    before = store.snapshot()

    response = send(
        client,
        url + change.get("suffix", ""),
        change.get("data"),
        method=change.get("method", "post"),
    )

    assert_problem(response, 422, "idempotency_key_mismatch")
    assert len(runs) == 1
    assert store.snapshot() == before
    assert send(client, url).content == first.content


def multipart(boundary: str, **fields) -> dict:
    """``send()`` arguments for a multipart body with ``fields`` and the given boundary."""
    return {
        "data": encode_multipart(boundary, fields),
        "content_type": f"multipart/form-data; boundary={boundary}",
    }


@pytest.mark.parametrize(
    ("first", "retry"),
    [
        (
            {"data": '{"amount": 5, "note": "x"}'},
            {"data": '{\n  "note":"x",\n  "amount":5\n}'},
        ),
        ({"suffix": "?a=1&b=2"}, {"suffix": "?b=2&a=1"}),
        (
            {"data": "amount=5&note=x", "content_type": "application/x-www-form-urlencoded"},
            {"data": "note=x&amount=5", "content_type": "application/x-www-form-urlencoded"},
        ),
        (
            multipart("FirstBoundary", amount="5", note="n"),
            multipart("AnotherBoundary42", amount="5", note="n"),
        ),
    ],
    ids=["JSON key order and whitespace", "query order", "form field order", "multipart boundary"],
)
def test_re_encoded_request_is_replayed_not_refused(client, url, runs, first, retry):
    def resend(options):
        return send(
            client,
            url + options.get("suffix", ""),
            options.get("data"),
            content_type=options.get("content_type", JSON),
        )

    original = resend(first)
    replay = resend(retry)

    assert original.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == original.content
    assert len(runs) == 1


def test_same_file_uploaded_again_is_replayed_and_a_different_file_refused(client, url, runs):
    def upload(content: bytes, boundary: str):
        receipt = SimpleUploadedFile("receipt.txt", content, "text/plain")
        return send(client, url, **multipart(boundary, amount="5", receipt=receipt))

    first = upload(b"receipt one", "BoundaryA")
    again = upload(b"receipt one", "BoundaryB")
    other = upload(b"receipt two", "BoundaryA")

    assert first.status_code == 201
    assert again["Idempotent-Replayed"] == "true"
    assert_problem(other, 422, "idempotency_key_mismatch")
    assert len(runs) == 1


# -- In progress ----------------------------------------------------------------------------


def test_key_held_by_a_live_request_answers_409_with_retry_after(client, url, runs, store):
    store.plant(KEY, path=url, fingerprint=fingerprint_of(url))
    before = store.snapshot()

    response = send(client, url)

    assert_problem(response, 409, "idempotency_key_in_progress")
    assert 1 <= int(response["Retry-After"]) <= 30
    assert runs == []
    assert store.snapshot() == before


def test_key_held_by_a_live_request_for_another_request_answers_422(client, url, runs, store):
    store.plant(KEY, path=url, fingerprint="f" * 64)

    assert_problem(send(client, url), 422, "idempotency_key_mismatch")
    assert runs == []


def test_waiting_duplicate_gives_up_with_409_after_the_configured_wait(client, url, runs, store):
    waiting_url = f"{url}short-wait/"
    store.plant(KEY, path=waiting_url, fingerprint=fingerprint_of(waiting_url))

    started = time.monotonic()
    response = send(client, waiting_url)
    waited = time.monotonic() - started

    assert_problem(response, 409, "idempotency_key_in_progress")
    assert response.has_header("Retry-After")
    assert 0.3 <= waited < 5
    assert runs == []


def test_wait_setting_makes_a_duplicate_wait_before_its_409(client, url, runs, store, settings):
    settings.IDEMPOTENCY_WAIT = timedelta(seconds=0.3)
    store.plant(KEY, path=url, fingerprint=fingerprint_of(url))

    started = time.monotonic()
    response = send(client, url)

    assert_problem(response, 409, "idempotency_key_in_progress")
    assert time.monotonic() - started >= 0.3
    assert runs == []


# Only the database store has the atomic mode, so only it can hold a claim without a lease.
@database_only
def test_unfinished_claim_without_a_lease_whose_request_died_is_taken_over(
    client, url, runs, store
):
    # An atomic-mode claim: no lease, and nobody holds its row lock any more.
    store.plant(KEY, path=url, fingerprint=fingerprint_of(url), lease=None)

    response = send(client, url)

    assert response.status_code == 201
    assert len(runs) == 1
    record = store.get(KEY)
    assert record.state == "completed"
    assert record.body == response.content


# Only the database store has the atomic mode, so only it can hold a claim without a lease.
@database_only
@pytest.mark.parametrize("kind", sorted(ATOMIC_KINDS & set(BASE_URLS)))
def test_claim_left_by_a_request_that_died_does_not_block_a_corrected_retry(
    client, url, runs, store
):
    # The atomic mode promises that a crash rolls everything back, the claim included, so
    # the retry starts clean: a corrected request may use the key (as after a raised error).
    store.plant(KEY, path=url, fingerprint=fingerprint_of(url), lease=None)

    response = send(client, url, {"amount": 6})

    assert response.status_code == 201, response.content
    assert len(runs) == 1
    assert send(client, url, {"amount": 6})["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("kind", sorted(set(BASE_URLS) - ATOMIC_KINDS))
def test_live_request_keeps_its_key_even_when_its_ttl_has_passed(client, url, runs, store):
    # A TTL shorter than a slow lease-mode view: its lease is renewed, so it is still running.
    store.plant(KEY, path=url, fingerprint=fingerprint_of(url), expired=True)

    response = send(client, url)

    assert_problem(response, 409, "idempotency_key_in_progress")
    assert runs == []


def test_unfinished_claim_whose_lease_passed_on_the_store_clock_is_taken_over(
    client, url, runs, store, app_clock
):
    store.plant(KEY, path=url, fingerprint=fingerprint_of(url), lease=timedelta(seconds=-1))
    app_clock(-timedelta(hours=1))  # by the app's clock the lease would run for another hour

    response = send(client, url)

    assert response.status_code == 201
    assert len(runs) == 1


def test_live_lease_on_the_store_clock_answers_409_whatever_the_app_clock_says(
    client, url, runs, store, app_clock
):
    store.plant(KEY, path=url, fingerprint=fingerprint_of(url), lease=timedelta(seconds=30))
    app_clock(timedelta(hours=1))  # by the app's clock the lease passed long ago

    assert_problem(send(client, url), 409, "idempotency_key_in_progress")
    assert runs == []


# -- Expiry -----------------------------------------------------------------------------------


def test_expired_key_is_treated_as_new_and_its_record_replaced(client, url, runs, store):
    store.plant(KEY, path="/elsewhere/", fingerprint="0" * 64, response=STORED, expired=True)

    response = send(client, url)

    assert response.status_code == 201
    assert response.content != STORED[2]
    assert len(runs) == 1
    assert store.count() == 1
    record = store.get(KEY)
    assert record.fingerprint == fingerprint_of(url)
    assert (record.path, record.status, record.body) == (url, 201, response.content)
    assert_kept_for(record, timedelta(hours=24))
    assert send(client, url)["Idempotent-Replayed"] == "true"


def test_key_expired_only_by_the_store_clock_is_treated_as_new(client, url, runs, store, app_clock):
    send(client, url)
    store.expire(KEY)
    app_clock(-timedelta(hours=1))  # by the app's clock the key would live another hour

    response = send(client, url)

    assert not response.has_header("Idempotent-Replayed")
    assert len(runs) == 2


def test_key_live_by_the_store_clock_is_replayed_whatever_the_app_clock_says(
    client, url, runs, app_clock
):
    first = send(client, url)
    app_clock(timedelta(days=2))  # past the 24-hour TTL by the app's clock only

    retry = send(client, url)

    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert len(runs) == 1


def test_ttl_option_sets_how_long_the_response_is_kept(client, url, store):
    send(client, f"{url}ttl/")

    assert_kept_for(store.get(KEY), timedelta(days=2))


def test_ttl_setting_sets_how_long_the_response_is_kept(client, url, store, settings):
    settings.IDEMPOTENCY_TTL = timedelta(minutes=5)

    send(client, url)

    assert_kept_for(store.get(KEY), timedelta(minutes=5))


def test_response_is_kept_for_24_hours_by_default(client, url, store):
    send(client, url)

    assert_kept_for(store.get(KEY), timedelta(hours=24))


def test_first_answer_carries_its_keys_expiry_which_is_never_stored(client, url, store, settings):
    settings.IDEMPOTENCY_TTL = timedelta(minutes=5)

    response = send(client, url)

    assert response.status_code == 201
    assert 300 - 2 <= expires_in(response) <= 300 + 1  # HTTP-dates are whole seconds
    stored_names = {name.lower() for name, _ in store.get(KEY).headers}
    assert "idempotency-key-expires" not in stored_names


def test_replay_carries_the_keys_expiry_as_the_store_holds_it(client, url, runs, store):
    send(client, url)
    store.set_expiry(KEY, timedelta(minutes=7))  # as if 24 h minus 7 min had passed

    retry = send(client, url)

    assert retry["Idempotent-Replayed"] == "true"
    assert 420 - 2 <= expires_in(retry) <= 420 + 1
    assert len(runs) == 1


def test_expiry_is_sent_only_with_answers_that_are_stored(client, url, runs, store):
    send(client, url)
    store.plant("busy", path=url, fingerprint=fingerprint_of(url))

    answers = [
        send(client, url, {"amount": 99}),  # 422 mismatch
        send(client, url, key="busy"),  # 409 in progress
        send(client, f"{url}?behaviour=500", key="server-error"),  # a 5xx: not stored
        send(client, f"{url}?behaviour=stream", key="streamed"),  # completed without a body
    ]

    assert [answer.status_code for answer in answers] == [422, 409, 500, 201]
    assert not any(answer.has_header("Idempotency-Key-Expires") for answer in answers)
    assert store.get("server-error") is None


# -- Store unreachable ----------------------------------------------------------------------


def test_unreachable_store_answers_503_and_the_view_does_not_run(client, url, runs, store):
    store.make_unreachable()

    response = send(client, url)

    assert_problem(response, 503, "idempotency_store_unavailable")
    assert int(response["Retry-After"]) >= 1
    assert runs == []
    assert Charge.objects.count() == 0
    assert store.count() == 0


def test_unreachable_store_does_not_matter_to_a_request_without_key(client, url, runs, store):
    store.make_unreachable()

    assert send(client, url, key=None).status_code == 201
    assert len(runs) == 1


# -- The storing rule ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_view_that_raises_stores_nothing_and_leaves_the_key_free(client, url, kind, runs, store):
    failing = f"{url}?behaviour=raise"

    for _ in range(2):
        with pytest.raises(RuntimeError, match="the view failed"):
            send(client, failing)

    assert len(runs) == 2
    assert store.count() == 0
    # In the atomic mode the failed attempts' writes rolled back with them.
    assert Charge.objects.count() == (0 if atomic_mode(kind, store) else 2)
    corrected = send(client, url)
    assert corrected.status_code == 201
    assert not corrected.has_header("Idempotent-Replayed")
    assert send(client, url)["Idempotent-Replayed"] == "true"


@pytest.mark.django_db(transaction=True)
def test_returned_client_error_is_stored_and_replayed(client, url, runs, store):
    first = send(client, f"{url}?behaviour=400")
    retry = send(client, f"{url}?behaviour=400")

    assert first.status_code == 400
    assert retry["Idempotent-Replayed"] == "true"
    assert (retry.status_code, retry.content) == (400, first.content)
    assert len(runs) == 1
    assert store.get(KEY).status == 400


@pytest.mark.django_db(transaction=True)
def test_returned_server_error_is_not_stored_and_leaves_the_key_free(
    client, url, kind, runs, store
):
    first = send(client, f"{url}?behaviour=500")
    retry = send(client, f"{url}?behaviour=500")

    assert first.status_code == retry.status_code == 500
    assert not retry.has_header("Idempotent-Replayed")
    assert len(runs) == 2
    assert store.count() == 0
    # In the atomic mode the view's writes are rolled back with its unstored response.
    assert Charge.objects.count() == (0 if atomic_mode(kind, store) else 2)
    assert send(client, url).status_code == 201


@pytest.mark.django_db(transaction=True)
def test_server_error_is_stored_when_the_setting_says_so(client, url, runs, store, settings):
    settings.IDEMPOTENCY_STORE_SERVER_ERRORS = True

    first = send(client, f"{url}?behaviour=500")
    retry = send(client, f"{url}?behaviour=500")

    assert retry["Idempotent-Replayed"] == "true"
    assert (retry.status_code, retry.content) == (500, first.content)
    assert len(runs) == 1
    assert Charge.objects.count() == 1
    assert store.get(KEY).status == 500


@pytest.mark.django_db(transaction=True)
def test_status_left_out_of_the_stored_statuses_setting_frees_the_key(
    client, url, kind, runs, store, settings
):
    settings.IDEMPOTENCY_STORED_STATUSES = ("2xx",)

    first = send(client, f"{url}?behaviour=400")
    retry = send(client, f"{url}?behaviour=400")

    assert first.status_code == retry.status_code == 400
    assert not retry.has_header("Idempotent-Replayed")
    assert len(runs) == 2
    assert store.count() == 0
    # As for an unstored 5xx: in the atomic mode the view's writes are rolled back.
    assert Charge.objects.count() == (0 if atomic_mode(kind, store) else 2)
    assert send(client, url).status_code == 201
    assert store.get(KEY).status == 201


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("statuses", "behaviour", "status"),
    [(("2xx", 400), "400", 400), (("2XX", "5xx"), "500", 500)],
    ids=["exact-code", "server-error-class"],
)
def test_status_named_by_the_stored_statuses_setting_is_stored_and_replayed(
    client, url, runs, store, settings, statuses, behaviour, status
):
    settings.IDEMPOTENCY_STORED_STATUSES = statuses

    first = send(client, f"{url}?behaviour={behaviour}")
    retry = send(client, f"{url}?behaviour={behaviour}")

    assert retry["Idempotent-Replayed"] == "true"
    assert (retry.status_code, retry.content) == (status, first.content)
    assert len(runs) == 1
    assert store.get(KEY).status == status


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_stored_statuses_option_of_a_view_wins_over_the_setting(kind, store, settings):
    settings.IDEMPOTENCY_STORED_STATUSES = ("2xx", "4xx")
    runs = []

    if kind == "sync":

        @idempotent(stored_statuses=("2xx", 409))
        def charge(request):
            runs.append(1)
            return HttpResponse(status=int(request.GET["status"]))

        def call(status):
            return charge(
                RequestFactory().post(f"/charge/?status={status}", headers={"Idempotency-Key": KEY})
            )

    else:

        @idempotent(stored_statuses=("2xx", 409))
        async def charge(request):
            runs.append(1)
            return HttpResponse(status=int(request.GET["status"]))

        def call(status):
            request = RequestFactory().post(
                f"/charge/?status={status}", headers={"Idempotency-Key": KEY}
            )
            return async_to_sync(charge)(request)

    # 404 is stored under the setting, not under the view's own list: the key is freed.
    assert [call(404).status_code, call(404).status_code] == [404, 404]
    assert len(runs) == 2
    assert store.count() == 0
    # 409 is in the view's list only: stored, and replayed.
    first, retry = call(409), call(409)
    assert (first.status_code, retry.status_code) == (409, 409)
    assert retry["Idempotent-Replayed"] == "true"
    assert len(runs) == 3
    assert store.get(KEY).status == 409


@pytest.mark.django_db(transaction=True)
def test_streaming_response_completes_the_key_without_a_body_and_is_never_rerun(
    client, url, runs, store
):
    first = send(client, f"{url}?behaviour=stream")
    retry = send(client, f"{url}?behaviour=stream")

    assert first.status_code == 201
    assert b"".join(first.streaming_content) == b"ab"
    body = assert_problem(retry, 409, "idempotency_response_not_stored")
    assert body["original_status"] == 201
    assert len(runs) == 1
    record = store.get(KEY)
    assert (record.state, record.status, record.body) == ("completed", 201, None)


@pytest.mark.django_db(transaction=True)
def test_response_over_the_maximum_size_is_never_rerun_nor_replayed(
    client, url, runs, store, settings
):
    settings.IDEMPOTENCY_MAX_RESPONSE_SIZE = 1000

    first = send(client, f"{url}?behaviour=large")
    retry = send(client, f"{url}?behaviour=large")

    assert first.status_code == 201
    assert len(first.content) > 1000
    body = assert_problem(retry, 409, "idempotency_response_not_stored")
    assert body["original_status"] == 201
    assert len(runs) == 1
    assert store.get(KEY).body is None


def test_response_of_exactly_the_maximum_size_is_stored(client, url, runs, settings):
    probe = send(client, f"{url}?behaviour=large", key="probe")
    settings.IDEMPOTENCY_MAX_RESPONSE_SIZE = len(probe.content)

    first = send(client, f"{url}?behaviour=large")
    retry = send(client, f"{url}?behaviour=large")

    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert len(runs) == 2


def test_answers_of_this_layer_are_never_stored(client, url, runs, store):
    send(client, url)
    before = store.snapshot()
    store.plant("busy", path=url, fingerprint=fingerprint_of(url))
    busy = store.snapshot()

    answers = [
        send(client, url, key=""),  # 400 invalid
        send(client, f"{url}required/", key=None),  # 400 missing
        send(client, url, {"amount": 99}),  # 422 mismatch
        send(client, url, key="busy"),  # 409 in progress
    ]

    assert [answer.status_code for answer in answers] == [400, 400, 422, 409]
    assert len(runs) == 1
    assert store.snapshot() == busy
    assert len(busy) == len(before) + 1


# -- Methods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "head", "options"])
def test_safe_methods_are_never_covered_even_when_listed(
    client, url, runs, store, settings, method
):
    settings.IDEMPOTENCY_METHODS = ["GET", "HEAD", "OPTIONS", "POST"]
    request = getattr(client, method)

    first = request(url, headers={"Idempotency-Key": KEY})
    second = request(url, headers={"Idempotency-Key": KEY})

    assert not second.has_header("Idempotent-Replayed")
    assert first.status_code < 500
    assert len(runs) == 2
    assert store.count() == 0


def test_patch_is_covered_by_default(client, url, runs):
    first = send(client, url, method="patch")
    retry = send(client, url, method="patch")

    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert len(runs) == 1


@pytest.mark.parametrize("method", ["put", "delete"])
def test_other_unsafe_methods_are_not_covered_by_default(client, url, runs, store, method):
    send(client, url, method=method)
    second = send(client, url, method=method)

    assert not second.has_header("Idempotent-Replayed")
    assert len(runs) == 2
    assert store.count() == 0


def test_methods_option_chooses_the_covered_methods(client, url, runs, store):
    put_only = f"{url}put-only/"

    send(client, put_only)
    post_again = send(client, put_only)
    send(client, put_only, method="put", key="put-key")
    put_again = send(client, put_only, method="put", key="put-key")

    assert not post_again.has_header("Idempotent-Replayed")
    assert put_again["Idempotent-Replayed"] == "true"
    assert len(runs) == 3
    assert store.count() == 1
    assert store.get("put-key").method == "PUT"


def test_methods_setting_chooses_the_covered_methods(client, url, runs, settings):
    settings.IDEMPOTENCY_METHODS = ["put"]

    send(client, url)
    post_again = send(client, url)
    send(client, url, method="put")
    put_again = send(client, url, method="put")

    assert not post_again.has_header("Idempotent-Replayed")
    assert put_again["Idempotent-Replayed"] == "true"
    assert len(runs) == 3


# -- Scope ----------------------------------------------------------------------------------


def test_same_key_from_two_users_runs_once_for_each_and_never_crosses(client, url, runs, store):
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    alice_client, bob_client = Client(), Client()
    alice_client.force_login(alice)
    bob_client.force_login(bob)

    alice_first = send(alice_client, url)
    bob_first = send(bob_client, url)
    alice_retry = send(alice_client, url)
    bob_retry = send(bob_client, url)

    assert not bob_first.has_header("Idempotent-Replayed")
    assert alice_first.json()["id"] != bob_first.json()["id"]
    assert alice_retry.content == alice_first.content
    assert bob_retry.content == bob_first.content
    assert len(runs) == 2
    assert store.count() == 2
    assert store.get(KEY, scope=f"user:{alice.pk}").body == alice_first.content
    assert store.get(KEY, scope=f"user:{bob.pk}").body == bob_first.content


def test_anonymous_callers_share_the_anonymous_scope_apart_from_users(client, url, runs, store):
    alice_client = Client()
    alice_client.force_login(UserFactory(username="alice"))

    anonymous_first = send(client, url)
    another_anonymous = send(Client(), url)
    alice_first = send(alice_client, url)

    assert another_anonymous["Idempotent-Replayed"] == "true"
    assert not alice_first.has_header("Idempotent-Replayed")
    assert alice_first.json()["id"] != anonymous_first.json()["id"]
    assert len(runs) == 2
    assert store.count() == 2
    assert store.get(KEY, scope="anonymous").body == anonymous_first.content


def test_scope_setting_scopes_keys_by_what_it_returns(client, url, runs, store, settings):
    settings.IDEMPOTENCY_SCOPE = "tests.views.tenant_scope"
    alice_client = Client()
    alice_client.force_login(UserFactory(username="alice"))

    acme = send(client, url, **{"X-Tenant": "acme"})
    globex = send(client, url, **{"X-Tenant": "globex"})
    acme_again = send(alice_client, url, **{"X-Tenant": "acme"})

    assert not globex.has_header("Idempotent-Replayed")
    assert acme_again["Idempotent-Replayed"] == "true"
    assert acme_again.content == acme.content
    assert len(runs) == 2
    assert store.count() == 2
    assert store.get(KEY, scope="tenant:acme").body == acme.content
    assert store.get(KEY, scope="tenant:globex").body == globex.content


def test_scopes_that_differ_only_in_case_never_share_a_response(client, url, runs, settings):
    # Scopes built from case-sensitive tokens (API keys, tenant ids) must stay apart.
    settings.IDEMPOTENCY_SCOPE = "tests.views.tenant_scope"

    send(client, url, **{"X-Tenant": "acme"})
    other_tenant = send(client, url, **{"X-Tenant": "ACME"})

    assert other_tenant.status_code == 201, other_tenant.content
    assert not other_tenant.has_header("Idempotent-Replayed")
    assert len(runs) == 2


def test_scope_longer_than_a_key_row_holds_still_separates_callers(client, url, runs, settings):
    settings.IDEMPOTENCY_SCOPE = "tests.views.tenant_scope"
    acme, globex = "acme-" + "a" * 300, "globex-" + "g" * 300

    send(client, url, **{"X-Tenant": acme})
    other = send(client, url, **{"X-Tenant": globex})
    again = send(client, url, **{"X-Tenant": acme})

    assert not other.has_header("Idempotent-Replayed")
    assert again["Idempotent-Replayed"] == "true"
    assert len(runs) == 2


def test_fingerprint_setting_decides_what_counts_as_the_same_request(client, url, runs, settings):
    settings.IDEMPOTENCY_FINGERPRINT = "tests.views.method_and_path_fingerprint"

    first = send(client, url, {"amount": 5})
    other_body = send(client, url, {"amount": 6})
    other_method = send(client, url, method="patch")

    assert other_body["Idempotent-Replayed"] == "true"
    assert other_body.content == first.content
    assert_problem(other_method, 422, "idempotency_key_mismatch")
    assert len(runs) == 1


def test_fingerprint_longer_than_a_digest_still_tells_requests_apart(client, url, runs, settings):
    settings.IDEMPOTENCY_FINGERPRINT = "tests.views.verbose_fingerprint"

    first = send(client, url, {"amount": 5})
    retry = send(client, url, {"amount": 5})
    other = send(client, url, {"amount": 6})

    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert_problem(other, 422, "idempotency_key_mismatch")
    assert len(runs) == 1


# -- Modes ----------------------------------------------------------------------------------


def test_running_view_holds_its_key_as_in_progress(client, url, kind, store, settings):
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(minutes=2)

    seen = send(client, f"{url}?behaviour=peek").json()

    if atomic_mode(kind, store) and store.advisory_claims:
        # PostgreSQL's advisory claims hold the key with locks: no row until the response
        # is stored, with the view's writes (docs/modes.md, "Advisory claims").
        assert (seen["keys"], seen["state"]) == (0, None)
        return
    assert (seen["keys"], seen["state"]) == (1, "in_progress")
    # The atomic mode holds a row lock, with no lease; the lease mode a renewable lease.
    if atomic_mode(kind, store):
        assert seen["lease"] is None
    else:
        assert seen["lease"] == pytest.approx(120, abs=5)


@pytest.mark.skipif(not HAS_DRF, reason="needs Django REST Framework")
def test_decorator_above_api_view_is_refused_because_drf_has_not_authenticated_yet():
    from rest_framework.decorators import api_view

    @api_view(["POST"])
    def charge(request): ...

    with pytest.raises(ImproperlyConfigured, match="below @api_view"):
        idempotent(charge)


@pytest.mark.skipif(not HAS_DRF, reason="needs Django REST Framework")
def test_decorator_above_api_view_names_the_users_function():
    from rest_framework.decorators import api_view

    @api_view(["POST"])
    def charge(request): ...

    with pytest.raises(ImproperlyConfigured) as caught:
        idempotent(charge)

    assert f"on {__name__}.charge;" in str(caught.value)
    assert "as_view" not in str(caught.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"methods": "POST"}, "methods must be a list or tuple of HTTP method names, not 'POST'"),
        ({"methods": ["POST", 1]}, "methods must be a list or tuple of HTTP method names"),
        ({"methods": ["PO ST"]}, "methods must be a list or tuple of HTTP method names"),
        ({"ttl": 3600}, "ttl must be a positive timedelta, not 3600 (int)"),
        ({"ttl": timedelta(0)}, "ttl must be a positive timedelta"),
        ({"ttl": timedelta(seconds=-5)}, "ttl must be a positive timedelta"),
        ({"ttl": timedelta(days=999_999)}, "ttl must be a timedelta of at most 36500 days"),
        ({"ttl": timedelta.max}, "ttl must be a timedelta of at most 36500 days"),
        ({"methods": []}, "methods must name at least one method to cover, not []"),
        ({"methods": ("POST\n",)}, "methods must be a list or tuple of HTTP method names"),
        ({"methods": ["GET", "head"]}, "safe methods (GET, HEAD, OPTIONS, TRACE) are never"),
        ({"wait": 2}, "wait must be a datetime.timedelta of zero or more, not 2 (int)"),
        ({"wait": timedelta(seconds=-1)}, "wait must be a datetime.timedelta of zero or more"),
        ({"required": "yes"}, "required must be True or False, not 'yes' (str)"),
        ({"required": 1}, "required must be True or False, not 1 (int)"),
        ({"atomic": "false"}, "atomic must be True or False, not 'false' (str)"),
        ({"stored_statuses": "2xx"}, "stored_statuses must be None, or a list or tuple of"),
        ({"stored_statuses": ["2xx", "6xx"]}, "stored_statuses must be None, or a list"),
        ({"stored_statuses": [200, 99]}, "status codes (200 to 599), not [200, 99] (list)"),
        ({"stored_statuses": [True]}, "stored_statuses must be None, or a list or tuple of"),
        ({"stored_statuses": [600]}, "stored_statuses must be None, or a list or tuple of"),
        ({"stored_statuses": ()}, "stored_statuses must name at least one status class or"),
    ],
)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_wrong_option_is_refused_when_the_view_is_decorated(options, message, kind):
    # Never at request time: methods="POST" used to mean the methods P, O, S and T (and so
    # no protection at all), ttl=3600 a 500 on every keyed request, wait=2 an AttributeError.
    if kind == "sync":

        def charge(request): ...

    else:

        async def charge(request): ...

    with pytest.raises(ImproperlyConfigured) as caught:
        idempotent(**options)(charge)

    text = str(caught.value)
    assert text.startswith(f"@idempotent on {__name__}.")
    assert ".charge: " in text
    assert message in text


def test_the_hint_of_a_wrong_duration_shows_the_option_as_written():
    with pytest.raises(ImproperlyConfigured, match=r"ttl=timedelta\(seconds=30\)"):
        idempotent(ttl=30)(lambda request: None)


def test_right_options_are_kept_as_given_and_methods_upper_cased():
    @idempotent(methods=("put", "post"), ttl=timedelta(hours=1), wait=timedelta(0))
    def charge(request): ...

    options = charge.idempotency_options
    assert options.methods == frozenset({"PUT", "POST"})
    assert (options.ttl, options.wait) == (timedelta(hours=1), timedelta(0))


def test_stored_statuses_option_is_kept_as_a_set_with_its_classes_lower_cased():
    @idempotent(stored_statuses=["2XX", 404, 410, "2xx"])
    def charge(request): ...

    assert charge.idempotency_options.stored_statuses == frozenset({"2xx", 404, 410})


@pytest.mark.parametrize("value", [True, "charge", 3])
def test_a_positional_option_is_a_type_error_that_shows_the_keyword_form(value):
    with pytest.raises(TypeError, match=r"by keyword.*@idempotent\(required=True\)"):
        idempotent(value)


def test_atomic_mode_cannot_wrap_an_async_view():
    async def charge(request): ...

    with pytest.raises(ImproperlyConfigured, match=r"atomic=True.*charge"):
        idempotent(atomic=True)(charge)


@cache_only
def test_atomic_option_with_a_store_without_an_atomic_mode_is_refused_naming_the_store():
    @idempotent(atomic=True)
    def charge(request):
        return HttpResponse(status=201)

    request = RequestFactory().post("/charge/", headers={"Idempotency-Key": KEY})
    with pytest.raises(ImproperlyConfigured, match=r"CacheStore has no atomic mode"):
        charge(request)


# The atomic mode, and the view's writes rolling back with it, exist in the database store only.
@database_only
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", sorted(ATOMIC_KINDS & set(BASE_URLS)))
def test_atomic_mode_keeps_its_promises_under_atomic_requests(
    client, url, runs, store, monkeypatch
):
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)

    server_error = send(client, f"{url}?behaviour=500")
    with pytest.raises(RuntimeError):
        send(client, f"{url}?behaviour=raise")
    first = send(client, url)
    retry = send(client, url)

    assert server_error.status_code == 500
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert len(runs) == 3
    assert Charge.objects.count() == 1
    assert store.count() == 1


# -- Bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\xff\xfe\x00garbage", JSON),
        (b"amount=\xff\xfe", "application/x-www-form-urlencoded"),
        (b'{"amount": ', JSON),
        (b"[" * 50_000 + b"]" * 50_000, JSON),
    ],
    ids=["non-UTF-8 JSON", "non-UTF-8 form", "unparsable JSON", "deeply nested JSON"],
)
def test_unreadable_body_is_left_to_the_view_and_never_a_server_error(
    client, url, body, content_type
):
    response = send(client, url, body, content_type=content_type)
    retry = send(client, url, body, content_type=content_type)

    assert response.status_code < 500
    assert response["Content-Type"] != "application/problem+json"
    assert retry.content == response.content


@pytest.mark.parametrize(
    "request_body",
    [
        {"data": json.dumps({"amount": 5, "note": "n" * 2000}), "content_type": JSON},
        {
            "data": "amount=5&note=" + "n" * 2000,
            "content_type": "application/x-www-form-urlencoded",
        },
        {"data": "n" * 2000, "content_type": "text/plain"},
        multipart("Boundary", amount="5", note="n" * 2000),
    ],
    ids=["JSON", "form", "text", "multipart"],
)
def test_body_over_the_upload_limit_is_refused_with_400(
    client, url, runs, store, settings, request_body
):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

    response = send(client, url, **request_body)

    assert_problem(response, 400, "idempotency_request_invalid")
    assert runs == []
    assert store.count() == 0


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        (kind, where)
        for kind in BASE_URLS
        for where in ("urlencoded form", "multipart form", "query string")
        # DRF reads the query string, and refuses it, before @idempotent runs.
        if (kind, where) != ("api", "query string")
    ],
)
def test_request_with_too_many_fields_is_refused_with_400(
    client, url, runs, store, settings, where
):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    fields = {f"field{n}": "x" for n in range(20)}
    pairs = "&".join(f"{name}={value}" for name, value in fields.items())

    if where == "multipart form":
        response = send(client, url, **multipart("Boundary", **fields))
    elif where == "urlencoded form":
        response = send(client, url, pairs, content_type="application/x-www-form-urlencoded")
    else:
        response = send(client, f"{url}?{pairs}")

    assert_problem(response, 400, "idempotency_request_invalid")
    assert runs == []
    assert store.count() == 0


def test_broken_multipart_body_is_refused_with_400(client, url, runs, store):
    response = send(client, url, b"not multipart at all", content_type="multipart/form-data")

    assert_problem(response, 400, "idempotency_request_invalid")
    assert runs == []
    assert store.count() == 0
