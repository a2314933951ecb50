"""Unit tests of ``django_idempotency.core``: keys, scopes, fingerprints and responses, and the
store protocol that core relies on, run against each store."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ImproperlyConfigured
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import RequestFactory
from django.test.client import encode_multipart

from django_idempotency.conf import get_store
from django_idempotency.core import (
    Options,
    error_response,
    parse_key,
    replay_response,
    request_fingerprint,
    user_scope,
)
from django_idempotency.exceptions import (
    IdempotencyError,
    IdempotencyKeyInProgress,
    IdempotencyKeyInvalid,
    IdempotencyKeyMismatch,
    IdempotencyKeyMissing,
    IdempotencyResponseNotStored,
    RequestInvalid,
    StoreUnavailable,
)
from django_idempotency.stores import ClaimRequest, StoredResponse
from tests.factories import UserFactory

factory = RequestFactory()

# -- parse_key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("abc", "abc"),
        ('"abc"', "abc"),
        ("  abc\t", "abc"),
        ('\t"abc" ', "abc"),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"a\\"b"', 'a"b'),
        ('"a\\\\b"', "a\\b"),
        ('"a,b"', "a,b"),
        ("k" * 255, "k" * 255),
        ('"' + "k" * 255 + '"', "k" * 255),
        ("~!#$%&'*+-.^_`|", "~!#$%&'*+-.^_`|"),
    ],
    ids=[
        "bare",
        "quoted",
        "bare with padding",
        "quoted with padding",
        "UUID",
        "escaped quote",
        "escaped backslash",
        "comma inside quotes",
        "255 characters bare",
        "255 characters quoted",
        "punctuation",
    ],
)
def test_parse_key_reads_bare_and_structured_field_string_keys(raw, key):
    assert parse_key(raw) == key


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        '""',
        "k" * 256,
        '"' + "k" * 256 + '"',
        "abc\x00",
        "abc\x1f",
        "abc\x7f",
        "ab\tc",
        '"ab\tc"',
        "clé",
        '"clé"',
        "a, b",
        "a,b",
        '"a", "b"',
        '"a","b"',
        '"abc',
        '"abc\\"',
        '"abc";p=1',
        '"abc" x',
        '"a\\b"',
    ],
    ids=[
        "empty",
        "whitespace only",
        "empty quoted string",
        "256 characters bare",
        "256 characters quoted",
        "NUL",
        "control character",
        "DEL",
        "tab inside bare",
        "tab inside quoted",
        "non-ASCII bare",
        "non-ASCII quoted",
        "two bare values",
        "two bare values without space",
        "two quoted values",
        "two quoted values without space",
        "unterminated quote",
        "escaped closing quote",
        "parameters",
        "text after the string",
        "bad escape",
    ],
)
def test_parse_key_refuses_malformed_values(raw):
    with pytest.raises(IdempotencyKeyInvalid):
        parse_key(raw)


# -- user_scope -----------------------------------------------------------------------------


def test_user_scope_of_an_authenticated_user_is_its_primary_key(db):
    request = factory.post("/")
    request.user = UserFactory()

    assert user_scope(request) == f"user:{request.user.pk}"


def test_user_scope_of_an_anonymous_user_is_anonymous():
    request = factory.post("/")
    request.user = AnonymousUser()

    assert user_scope(request) == "anonymous"


def test_user_scope_without_authentication_middleware_is_anonymous():
    assert user_scope(factory.post("/")) == "anonymous"


# -- request_fingerprint --------------------------------------------------------------------


def _json(body: str, path: str = "/orders/", method: str = "POST"):
    return factory.generic(method, path, body, "application/json")


def _form(body: str, path: str = "/orders/"):
    return factory.generic("POST", path, body, "application/x-www-form-urlencoded")


def _multipart(boundary: str, **fields):
    body = encode_multipart(boundary, fields)
    return factory.generic("POST", "/orders/", body, f"multipart/form-data; boundary={boundary}")


def fingerprint(request) -> str:
    return request_fingerprint(request)


def test_fingerprint_is_a_sha256_hex_digest():
    value = fingerprint(_json('{"a": 1}'))

    assert len(value) == 64
    assert int(value, 16) >= 0


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (_json('{"a": 1, "b": [1, 2]}'), _json('{\n  "b": [1,2],\n  "a": 1\n}')),
        (_json('{"a": {"x": 1, "y": 2}}'), _json('{"a": {"y": 2, "x": 1}}')),
        (_json('{"a": 1}', "/orders/?x=1&y=2"), _json('{"a": 1}', "/orders/?y=2&x=1")),
        (_form("a=1&b=2"), _form("b=2&a=1")),
        (_form("a=1&b=x+y"), _form("b=x%20y&a=1")),
        (_multipart("One", a="1", b="2"), _multipart("Two", b="2", a="1")),
        (
            factory.generic("POST", "/orders/", '{"a": 1}', "application/vnd.api+json"),
            factory.generic("POST", "/orders/", '{ "a" : 1 }', "application/vnd.api+json"),
        ),
    ],
    ids=[
        "JSON key order and whitespace",
        "nested JSON key order",
        "query parameter order",
        "form field order",
        "form encoding of a space",
        "multipart boundary and field order",
        "+json media type",
    ],
)
def test_re_encoded_requests_have_the_same_fingerprint(one, other):
    assert fingerprint(one) == fingerprint(other)


def test_multipart_files_count_by_content_not_boundary():
    def upload(content: bytes, boundary: str):
        receipt = SimpleUploadedFile("receipt.txt", content, "text/plain")
        return _multipart(boundary, a="1", receipt=receipt)

    assert fingerprint(upload(b"one", "A")) == fingerprint(upload(b"one", "B"))
    assert fingerprint(upload(b"one", "A")) != fingerprint(upload(b"two", "A"))


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (_json('{"a": 1}'), _json('{"a": 2}')),
        (_json('{"a": 1}'), _json('{"a": "1"}')),
        (_json('{"a": 1}'), _json('{"a": 1}', method="PATCH")),
        (_json('{"a": 1}'), _json('{"a": 1}', "/orders/other/")),
        (_json('{"a": 1}', "/orders/?x=1"), _json('{"a": 1}', "/orders/?x=2")),
        (_json('{"a": 1}', "/orders/?x=1"), _json('{"a": 1}', "/orders/")),
        (_json('{"a": 1}', "/orders/?x="), _json('{"a": 1}', "/orders/")),
        (_json('{"a": 1}', "/orders/?x=1&x=2"), _json('{"a": 1}', "/orders/?x=2&x=1")),
        (_form("a=1&a=2"), _form("a=2&a=1")),
        (_form("a=1"), _json('{"a": "1"}')),
        (
            factory.generic("POST", "/orders/", b"\x00\x01", "application/octet-stream"),
            factory.generic("POST", "/orders/", b"\x00\x02", "application/octet-stream"),
        ),
    ],
    ids=[
        "JSON value",
        "JSON type",
        "method",
        "path",
        "query value",
        "query parameter present",
        "blank query parameter",
        "order of a repeated query parameter",
        "order of a repeated form field",
        "form versus JSON",
        "raw body",
    ],
)
def test_different_requests_have_different_fingerprints(one, other):
    assert fingerprint(one) != fingerprint(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ('{"amount": 12345678901234567.89}', '{"amount": 12345678901234567.88}'),
        ('{"amount": 0.1}', '{"amount": 0.10000000000000001}'),
        ('{"amount": 1.0}', '{"amount": 1}'),
        ('{"amount": 1.50}', '{"amount": 1.5}'),
        ('{"amount": 1e2}', '{"amount": 100}'),
        ('{"ids": [9007199254740993]}', '{"ids": [9007199254740992]}'),
    ],
    ids=[
        "beyond a float's precision",
        "one float, two decimals",
        "integer and decimal",
        "trailing zero",
        "exponent",
        "integer beyond 2**53",
    ],
)
def test_json_numbers_are_compared_as_written(one, other):
    # A view that parses numbers as Decimal (DRF's DecimalField, json.loads(parse_float=
    # Decimal)) tells these apart, so they must never replay each other's answer.
    assert fingerprint(_json(one)) != fingerprint(_json(other))


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ('{"name": "\\u00e9", "b": 1}', '{"b":1,"name":"\u00e9"}'),
        ('{"a": "\\"quoted\\""}', '{ "a" : "\\u0022quoted\\u0022" }'),
        ('{"n": [1.5, -0.25, 10]}', '{"n":[1.5,-0.25,10]}'),
    ],
    ids=["escaped and literal characters", "escaped quotes", "numbers and whitespace"],
)
def test_json_written_differently_with_the_same_numbers_has_the_same_fingerprint(one, other):
    assert fingerprint(_json(one)) == fingerprint(_json(other))


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ('{"a": 1E5}', '{"a": 1e5}'),
        ('{"a": 1e+5}', '{"a": 1e5}'),
        ('{"a": 1e05}', '{"a": 1e5}'),
        ('{"a": [2.5E-3]}', '{"a": [2.5e-03]}'),
    ],
    ids=["exponent letter", "exponent sign", "exponent zeros", "negative exponent"],
)
def test_one_exponent_spelled_differently_has_the_same_fingerprint(one, other):
    # Every parser reads these as one number (float and Decimal alike): a client library
    # that spells exponents differently on a retry must get the replay, not a 422.
    assert fingerprint(_json(one)) == fingerprint(_json(other))


@pytest.mark.parametrize(
    ("one", "other"),
    [('{"a": 1.0e5}', '{"a": 1e5}'), ('{"a": 1e5}', '{"a": 100000}')],
    ids=["mantissa precision", "exponent and integer"],
)
def test_exponent_numbers_keep_their_mantissa_as_written(one, other):
    # Decimal("1.0e5") is not Decimal("1e5"): their precision differs.
    assert fingerprint(_json(one)) != fingerprint(_json(other))


def test_json_fingerprint_is_unchanged_for_integers_and_plain_decimals():
    # Fingerprints stored before numbers were kept as written must still match after an
    # upgrade for the usual bodies: the canonical form of these is what it was.
    request = _json('{"b": [1, 2.5, -3], "a": {"y": true, "x": null}}')
    expected = hashlib.sha256(
        json.dumps(["POST", "/orders/", []], ensure_ascii=False).encode()
        + b"\0json\0"
        + b'{"a":{"x":null,"y":true},"b":[1,2.5,-3]}'
    ).hexdigest()

    assert fingerprint(request) == expected


def _encoded(body: bytes, charset: str | None, kind: str = "application/x-www-form-urlencoded"):
    content_type = kind if charset is None else f"{kind}; charset={charset}"
    return factory.generic("POST", "/orders/", body, content_type)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"name=%C3%A9", "application/x-www-form-urlencoded"),
        ('{"name": "\u00e9"}'.encode(), "application/json"),
        (b"caf\xc3\xa9", "text/plain"),
    ],
    ids=["form", "JSON", "text"],
)
def test_a_charset_that_changes_the_decoding_is_part_of_the_fingerprint(body, kind):
    # Decoded as latin-1, these bytes are two other characters: the view sees "Ã©", not "é".
    assert fingerprint(_encoded(body, "latin-1", kind)) != fingerprint(_encoded(body, None, kind))


def test_a_charset_applies_to_the_query_string_too():
    one = factory.post("/orders/?name=%E9", content_type="text/plain; charset=latin-1")
    other = factory.post("/orders/?name=%E9", content_type="text/plain; charset=cp1252")
    utf8 = factory.post("/orders/?name=%E9", content_type="text/plain")

    assert len({fingerprint(one), fingerprint(other), fingerprint(utf8)}) == 3


@pytest.mark.parametrize("charset", ["base64", "zlib", "rot13", "hex"])
def test_a_charset_that_is_not_a_text_encoding_is_an_unreadable_request(charset):
    # Django keeps any charset codecs knows; these decode bytes to bytes, not to text.
    with pytest.raises(RequestInvalid) as caught:
        fingerprint(_encoded(b'{"a": 1}', charset, "application/json"))

    assert "not a text encoding" in str(caught.value.detail)


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", "utf8", "no-such-charset"])
def test_a_charset_that_decodes_as_the_default_does_not_change_the_fingerprint(charset):
    body = b"name=%C3%A9&b=1"

    assert fingerprint(_encoded(body, charset)) == fingerprint(_encoded(body, None))


def test_a_latin1_form_is_read_as_its_charset_says():
    # The same text, sent in two charsets, is one request.
    latin1 = _encoded(b"name=%E9", "latin-1")
    again = _encoded(b"name=%E9", "iso-8859-1")

    assert fingerprint(latin1) == fingerprint(again)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\xff\xfe not UTF-8", "application/json"),
        (b'{"a": ', "application/json"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        (b"a=\xff&b=\xfe", "application/x-www-form-urlencoded"),
    ],
    ids=["non-UTF-8 JSON", "unparsable JSON", "deeply nested JSON", "non-UTF-8 form"],
)
def test_fingerprint_of_an_unreadable_body_is_computed_from_its_bytes(body, content_type):
    request = factory.generic("POST", "/orders/", body, content_type)
    changed = factory.generic("POST", "/orders/", body + b" ", content_type)

    assert fingerprint(request) != fingerprint(changed)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"x" * 101, "application/json"),
        (b"a=" + b"x" * 101, "application/x-www-form-urlencoded"),
        (encode_multipart("B", {"a": "x" * 101}), "multipart/form-data; boundary=B"),
        (b"garbage", "multipart/form-data"),
    ],
    ids=["JSON over the limit", "form over the limit", "multipart over the limit", "no boundary"],
)
def test_fingerprint_of_a_body_the_view_could_not_read_raises_request_invalid(
    settings, body, content_type
):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100

    with pytest.raises(RequestInvalid):
        fingerprint(factory.generic("POST", "/orders/", body, content_type))


def test_fingerprint_leaves_a_multipart_upload_readable_by_the_view():
    receipt = SimpleUploadedFile("receipt.txt", b"the receipt", "text/plain")
    request = _multipart("B", a="1", receipt=receipt)

    fingerprint(request)

    assert request.POST["a"] == "1"
    assert request.FILES["receipt"].read() == b"the receipt"


def test_fingerprint_leaves_a_json_body_readable_by_the_view():
    request = _json('{"a": 1}')

    fingerprint(request)

    assert json.loads(request.body) == {"a": 1}


# -- error_response -------------------------------------------------------------------------

ERRORS = [
    (IdempotencyKeyMissing(), 400, "idempotency_key_missing"),
    (IdempotencyKeyInvalid(), 400, "idempotency_key_invalid"),
    (RequestInvalid(), 400, "idempotency_request_invalid"),
    (IdempotencyKeyInProgress(retry_after=2.2), 409, "idempotency_key_in_progress"),
    (IdempotencyResponseNotStored(original_status=201), 409, "idempotency_response_not_stored"),
    (IdempotencyKeyMismatch(), 422, "idempotency_key_mismatch"),
    (StoreUnavailable(retry_after=1), 503, "idempotency_store_unavailable"),
]


@pytest.mark.parametrize(("error", "status", "code"), ERRORS, ids=[e[2] for e in ERRORS])
def test_error_response_is_an_rfc_9457_problem(error, status, code):
    response = error_response(error)

    assert response.status_code == status
    assert response["Content-Type"] == "application/problem+json"
    body = json.loads(response.content)
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith(code)
    assert body["title"]
    assert body["detail"] == str(error.detail)
    assert "%(" not in body["detail"]
    assert not response.has_header("Idempotent-Replayed")


def test_error_codes_are_unique():
    codes = [error.default_code for error, _, _ in ERRORS]

    assert len(set(codes)) == len(codes)
    assert all(isinstance(error, IdempotencyError) for error, _, _ in ERRORS)


@pytest.mark.parametrize(
    ("retry_after", "header"), [(0, "1"), (0.2, "1"), (1, "1"), (2.2, "3"), (29.9, "30")]
)
def test_retry_after_is_a_whole_number_of_seconds_of_at_least_one(retry_after, header):
    response = error_response(IdempotencyKeyInProgress(retry_after=retry_after))

    assert response["Retry-After"] == header


def test_error_without_retry_after_has_no_retry_after_header():
    assert not error_response(IdempotencyKeyMismatch()).has_header("Retry-After")


def test_response_not_stored_problem_names_the_original_status():
    body = json.loads(error_response(IdempotencyResponseNotStored(original_status=202)).content)

    assert body["original_status"] == 202


def test_error_detail_can_be_given():
    body = json.loads(error_response(RequestInvalid("Body too large.")).content)

    assert body["detail"] == "Body too large."


# -- replay_response ------------------------------------------------------------------------


def test_replay_response_carries_status_body_and_headers_marked_as_replayed():
    stored = StoredResponse(
        status=201,
        headers=[
            ("Content-Type", "application/vnd.shop+json"),
            ("Location", "/orders/7"),
            ("ETag", '"v1"'),
            ("X-Custom", "kept"),
        ],
        body=b'{"id": 7}',
    )

    response = replay_response(stored)

    assert response.status_code == 201
    assert response.content == b'{"id": 7}'
    assert response["Content-Type"] == "application/vnd.shop+json"
    assert response["Location"] == "/orders/7"
    assert response["ETag"] == '"v1"'
    assert response["X-Custom"] == "kept"
    assert response["Idempotent-Replayed"] == "true"


def test_replay_of_a_response_without_content_type_invents_none():
    response = replay_response(StoredResponse(status=204, headers=[], body=b""))

    assert response.status_code == 204
    assert not response.has_header("Content-Type")
    assert response.content == b""


def test_replay_keeps_binary_bodies_byte_for_byte():
    body = bytes(range(256))
    stored = StoredResponse(status=200, headers=[("Content-Type", "image/png")], body=body)

    assert replay_response(stored).content == body


# -- Options.covered_methods ----------------------------------------------------------------


def test_covered_methods_default_to_post_and_patch():
    assert Options().covered_methods == {"POST", "PATCH"}


def test_covered_methods_follow_the_setting(settings):
    settings.IDEMPOTENCY_METHODS = ["post", "Put", "DELETE"]

    assert Options().covered_methods == {"POST", "PUT", "DELETE"}


def test_covered_methods_of_the_view_win_over_the_setting(settings):
    settings.IDEMPOTENCY_METHODS = ["POST"]

    assert Options(methods=["put", "patch"]).covered_methods == {"PUT", "PATCH"}


@pytest.mark.parametrize("safe", ["GET", "head", "OPTIONS", "TRACE"])
def test_covered_methods_never_include_a_safe_method(settings, safe):
    settings.IDEMPOTENCY_METHODS = [safe, "POST"]

    assert Options().covered_methods == {"POST"}
    assert Options(methods=[safe, "put"]).covered_methods == {"PUT"}
    with pytest.raises(ImproperlyConfigured, match="never covered"):
        Options(methods=[safe])  # a view's own list that covers nothing is a mistake


def test_multipart_patch_fingerprint_covers_its_fields_but_not_its_boundary():
    # Django parses request.POST/FILES for POST only; a PATCH's multipart body must still
    # count, or a changed PATCH would be replayed instead of refused.
    def patch(boundary, **fields):
        body = encode_multipart(boundary, fields)
        return RequestFactory().patch(
            "/orders/1/", body, content_type=f"multipart/form-data; boundary={boundary}"
        )

    one = request_fingerprint(patch("first-boundary", amount="1"))

    assert one == request_fingerprint(patch("second-boundary", amount="1"))
    assert one != request_fingerprint(patch("first-boundary", amount="999"))


# -- The store protocol, with each store -----------------------------------------------------

LEASE = timedelta(seconds=30)


def claim_request(fingerprint: str = "f" * 64, *, key: str = "order-1") -> ClaimRequest:
    """One request's claim of ``key``: a fresh owner token each time."""
    return ClaimRequest(
        scope="anonymous",
        key=key,
        fingerprint=fingerprint,
        method="POST",
        path="/orders/",
        token=uuid.uuid4().hex,
        ttl=timedelta(hours=1),
    )


@pytest.mark.django_db
def test_store_gives_a_new_key_to_its_first_claim_and_shows_the_holder_to_a_duplicate(store):
    first, duplicate = claim_request(), claim_request()
    backend = get_store()

    assert backend.get(scope="anonymous", key="order-1") is None
    assert backend.claim(first, lease=LEASE).owner_token == first.token
    held = backend.claim(duplicate, lease=LEASE)

    assert held.owner_token == first.token
    assert (held.state, held.fingerprint, held.live, held.response) == (
        "in_progress",
        first.fingerprint,
        True,
        None,
    )
    assert 25 < held.lease_remaining <= 30
    assert store.count() == 1


@pytest.mark.django_db
def test_store_keeps_a_completed_response_for_its_ttl_then_lets_a_new_claim_replace_it(store):
    first, retry = claim_request(), claim_request()
    response = StoredResponse(status=201, headers=[("Location", "/orders/7")], body=b"{}")
    backend = get_store()
    backend.claim(first, lease=LEASE)

    assert backend.complete(first, response) is True
    replayed = backend.claim(retry, lease=LEASE)
    assert (replayed.owner_token, replayed.state, replayed.response) == (
        first.token,
        "completed",
        response,
    )
    assert backend.release(first) is False  # a completed key is never given back

    store.expire("order-1")
    assert backend.claim(retry, lease=LEASE).owner_token == retry.token


@pytest.mark.django_db
def test_store_frees_a_released_claim_for_any_request(store):
    first, corrected = claim_request(), claim_request("e" * 64)
    backend = get_store()
    backend.claim(first, lease=LEASE)

    assert backend.release(first) is True
    assert store.count() == 0
    assert backend.claim(corrected, lease=LEASE).owner_token == corrected.token


@pytest.mark.django_db
def test_store_lets_only_the_same_request_take_over_a_passed_lease(store):
    dead, other, same = claim_request(), claim_request("e" * 64), claim_request()
    backend = get_store()
    backend.claim(dead, lease=LEASE)
    store.set_lease("order-1", timedelta(seconds=-1))

    # The dead request may have had side effects: only a retry of it may finish its work.
    assert backend.claim(other, lease=LEASE).owner_token == dead.token
    assert backend.claim(same, lease=LEASE).owner_token == same.token


@pytest.mark.django_db
def test_request_whose_lease_was_taken_over_cannot_renew_complete_or_release_the_key(store):
    old, new = claim_request(), claim_request()
    old_response = StoredResponse(status=201, headers=[], body=b'{"owner": "old"}')
    new_response = StoredResponse(status=201, headers=[], body=b'{"owner": "new"}')
    backend = get_store()
    backend.claim(old, lease=LEASE)
    store.set_lease("order-1", timedelta(seconds=-1))
    assert backend.claim(new, lease=LEASE).owner_token == new.token

    assert backend.renew(old, lease=LEASE) is False
    assert backend.complete(old, old_response) is False
    assert backend.release(old) is False
    assert backend.renew(new, lease=timedelta(minutes=2)) is True
    assert backend.complete(new, new_response) is True

    record = backend.get(scope="anonymous", key="order-1")
    assert (record.owner_token, record.response) == (new.token, new_response)
    assert store.get("order-1").body == b'{"owner": "new"}'
