"""Encryption at rest and the redaction hook (issue #15): ``django_idempotency.encryption``.

What a user sees: a response stored under ``IDEMPOTENCY_ENCRYPTION_KEYS`` is unreadable in the
database column, in the replay cache and in ``CacheStore``'s Redis record, and its replay is the
first answer byte for byte; keys rotate (the first encrypts, all decrypt); a response no key
can decrypt is answered ``503`` and logged, never replayed as ciphertext or run again; a
response stored before encryption was turned on still replays; ``IDEMPOTENCY_REDACT`` changes
what is stored (so what replays get); the admin shows only what it can decrypt; the settings
are checked without ever showing a key.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from io import StringIO

import pytest
from django.contrib import admin
from django.core.cache import caches
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import path, reverse

from django_idempotency import replay_cache
from django_idempotency.checks import check_settings
from django_idempotency.decorators import idempotent
from django_idempotency.encryption import SEALED_HEADER, Unreadable, open_response, seal
from django_idempotency.functions import idempotent_function
from django_idempotency.models import IdempotencyKey
from django_idempotency.records import StoredResponse, digest
from django_idempotency.stores import DatabaseStore
from tests.assertions import assert_problem
from tests.redis_support import delete_keys, new_prefix, raw_client, use_cache_store
from tests.views import HAS_DRF

fernet = pytest.importorskip("cryptography.fernet")

OLD_KEY = fernet.Fernet.generate_key().decode()
NEW_KEY = fernet.Fernet.generate_key().decode()

# What the view answers: every piece of it must be absent from what is stored.
CARD = "4242 4242 4242 4242"
HOLDER = "Ada Lovelace"
LOCATION = "/charges/ch_secret_9d1f/"
ran: list[str] = []


def _answer(request: HttpRequest) -> JsonResponse:
    ran.append(request.path)
    return JsonResponse(
        {"card": CARD, "holder": HOLDER, "amount": json.loads(request.body)["amount"]},
        status=201,
        headers={"Location": LOCATION, "X-Card-Holder": HOLDER},
    )


@idempotent
def atomic_charge(request):
    return _answer(request)


@idempotent(atomic=False)
def lease_charge(request):
    return _answer(request)


@idempotent
async def async_charge(request):
    return _answer(request)


@idempotent_function(atomic=False)
def card_of(holder):
    ran.append(holder)
    return {"card": CARD, "holder": holder}


if HAS_DRF:
    from rest_framework.views import APIView

    from django_idempotency.rest_framework import IdempotentMixin

    class ChargeView(IdempotentMixin, APIView):
        authentication_classes: list[type] = []
        permission_classes: list[type] = []

        def post(self, request):
            return _answer(request)


class OrmStore(DatabaseStore):
    """The ORM's statements on every database (``auto`` picks plain SQL on PostgreSQL/MySQL)."""

    statements = "orm"


def redact(request, response: StoredResponse) -> StoredResponse:
    """The documented example: drop a header, mask the card number, keep the rest."""
    assert isinstance(request, HttpRequest) or request is None
    redacted_for.append(None if request is None else request.path)
    data = json.loads(response.body)
    data["card"] = "**** " + data["card"][-4:]
    headers = [(name, value) for name, value in response.headers if name != "X-Card-Holder"]
    return StoredResponse(status=response.status, headers=headers, body=json.dumps(data).encode())


redacted_for: list[str | None] = []


def failing_redact(request, response):
    raise RuntimeError("the hook is broken")


def wrong_status_redact(request, response):
    return StoredResponse(status=200, headers=response.headers, body=response.body)


def newline_header_redact(request, response):
    return StoredResponse(status=response.status, headers=[("X-Note", "a\nb")], body=response.body)


def sealed_name_redact(request, response):
    return StoredResponse(status=response.status, headers=[(":encrypted", "x")], body=response.body)


NOT_CALLABLE = "a string"

urlpatterns = [
    path("atomic/", atomic_charge),
    path("lease/", lease_charge),
    path("async/", async_charge),
    path("admin/", admin.site.urls),
]
if HAS_DRF:
    urlpatterns.append(path("drf/", ChargeView.as_view()))

needs_drf = pytest.mark.skipif(not HAS_DRF, reason="DRF is not installed (tox minimal)")
VIEWS = ["/atomic/", "/lease/", "/async/", pytest.param("/drf/", marks=needs_drf)]
PLAINTEXT = [CARD.encode(), HOLDER.encode(), LOCATION.encode(), b"application/json"]

pytestmark = [pytest.mark.urls(__name__)]


@pytest.fixture(autouse=True)
def _clean():
    ran.clear()
    redacted_for.clear()


def post(url: str, key: str, amount: int = 7):
    return Client(raise_request_exception=False).post(
        url, {"amount": amount}, content_type="application/json", headers={"Idempotency-Key": key}
    )


def new_key() -> str:
    return f"enc-{uuid.uuid4()}"


def raw_row(key: str) -> tuple[bytes, str]:
    """The stored body and headers of ``key`` as the database holds them, past the ORM."""
    table = connection.ops.quote_name(IdempotencyKey._meta.db_table)
    body, headers = (
        connection.ops.quote_name(name) for name in ("response_body", "response_headers")
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {body}, {headers} FROM {table} WHERE {connection.ops.quote_name('key')} = %s",
            [key],
        )
        (row,) = cursor.fetchall()
    raw_headers = row[1] if isinstance(row[1], str) else json.dumps(row[1])
    return bytes(row[0]), raw_headers


def assert_no_plaintext(raw: bytes) -> None:
    for text in PLAINTEXT:
        assert text not in raw, text


def assert_same_answer(replay, first) -> None:
    assert replay.status_code == first.status_code == 201
    assert replay.content == first.content
    for name in ("Content-Type", "Location", "X-Card-Holder"):
        assert replay[name] == first[name]
    assert replay["Idempotent-Replayed"] == "true"
    assert not first.has_header("Idempotent-Replayed")


def sealed_body(key: str) -> bytes:
    return bytes(IdempotencyKey.objects.get(key=key).response_body)


# -- The database store ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "store", ["django_idempotency.stores.DatabaseStore", f"{__name__}.OrmStore"]
)
@pytest.mark.parametrize("url", VIEWS)
def test_an_encrypted_response_is_unreadable_in_the_database_and_replayed_byte_for_byte(
    settings, store, url
):
    settings.IDEMPOTENCY_STORE = store
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]
    key = new_key()

    first = post(url, key)
    replay = post(url, key)

    assert_same_answer(replay, first)
    assert ran == [url]
    body, headers = raw_row(key)
    assert_no_plaintext(body)
    assert_no_plaintext(headers.encode())
    assert SEALED_HEADER in headers
    # Ciphertext of the real body under the configured key, not a body thrown away.
    assert fernet.Fernet(NEW_KEY).decrypt(body) == first.content
    assert IdempotencyKey.objects.get(key=key).response_status == 201  # the status stays clear


@pytest.mark.django_db
def test_without_keys_responses_are_stored_as_they_are(settings):
    key = new_key()

    first = post("/atomic/", key)

    body, headers = raw_row(key)
    assert body == first.content
    assert LOCATION in headers


@pytest.mark.django_db
def test_a_response_stored_before_encryption_was_turned_on_still_replays(settings):
    key = new_key()
    first = post("/atomic/", key)
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]

    replay = post("/atomic/", key)

    assert_same_answer(replay, first)
    assert ran == ["/atomic/"]


@pytest.mark.django_db
def test_a_mismatching_request_is_still_refused_under_encryption(settings):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]
    key = new_key()
    post("/atomic/", key, amount=7)

    assert_problem(post("/atomic/", key, amount=8), 422, "idempotency_key_mismatch")


# -- Rotation -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_keys_rotate_the_first_encrypts_and_every_key_decrypts(settings):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD_KEY]
    old = new_key()
    first_old = post("/atomic/", old)

    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY, OLD_KEY]  # rotation: the new key first
    assert_same_answer(post("/atomic/", old), first_old)
    new = new_key()
    first_new = post("/atomic/", new)

    assert fernet.Fernet(NEW_KEY).decrypt(sealed_body(new)) == first_new.content
    with pytest.raises(fernet.InvalidToken):
        fernet.Fernet(OLD_KEY).decrypt(sealed_body(new))
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]  # the old key dropped
    assert_same_answer(post("/atomic/", new), first_new)
    assert ran == ["/atomic/", "/atomic/"]


@pytest.mark.django_db
@pytest.mark.parametrize("keys", [[NEW_KEY], []], ids=["another-key", "no-keys"])
def test_a_response_no_key_can_decrypt_is_answered_503_and_logged_never_run_again(
    settings, caplog, keys
):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD_KEY]
    key = new_key()
    post("/atomic/", key)
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = keys
    settings.IDEMPOTENCY_FAIL_OPEN = True  # never a reason to run the view again

    with caplog.at_level(logging.ERROR, logger="django_idempotency"):
        answer = post("/atomic/", key)

    problem = assert_problem(answer, 503, "idempotency_store_unavailable")
    assert "cannot be read" in problem["detail"]
    assert answer["Retry-After"] == "60"
    assert sealed_body(key)[40:80] not in answer.content  # no ciphertext either
    assert ran == ["/atomic/"]
    (record,) = [r for r in caplog.records if "cannot be replayed" in r.getMessage()]
    assert key in record.getMessage()
    assert OLD_KEY not in record.getMessage()


@pytest.mark.django_db
def test_a_response_copied_into_another_keys_row_is_not_replayed(settings, caplog):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]
    victim, attacker = new_key(), new_key()
    post("/atomic/", victim)
    post("/atomic/", attacker)
    stolen = IdempotencyKey.objects.get(key=victim)
    IdempotencyKey.objects.filter(key=attacker).update(
        response_headers=stolen.response_headers, response_body=stolen.response_body
    )

    answer = post("/atomic/", attacker)

    assert_problem(answer, 503, "idempotency_store_unavailable")
    assert "encrypted for another key" in caplog.text


@pytest.mark.django_db
def test_a_function_result_is_encrypted_and_replayed(settings):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]

    first = card_of(HOLDER, idempotency_key="card-1")
    again = card_of(HOLDER, idempotency_key="card-1")

    assert first == again == {"card": CARD, "holder": HOLDER}
    assert ran == [HOLDER]
    assert_no_plaintext(sealed_body("card-1"))


# -- Redis: the replay cache and CacheStore -------------------------------------------------


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_the_replay_cache_holds_only_the_sealed_response(settings):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]
    settings.IDEMPOTENCY_REPLAY_CACHE = "redis"
    cache = caches["redis"]
    key = new_key()
    name = replay_cache.cache_key("anonymous", key)
    try:
        first = post("/lease/", key)
        (stored,) = raw_client("redis").scan_iter(match=f"*{name}")
        raw = raw_client("redis").get(stored)
        with CaptureQueriesContext(connection) as captured:
            replay = post("/lease/", key)
    finally:
        cache.delete(name)

    assert raw is not None
    assert_no_plaintext(raw)
    assert_same_answer(replay, first)
    assert captured.captured_queries == []  # answered from the cache, decrypted there


@pytest.fixture
def cache_store(settings):
    prefix = new_prefix()
    location = settings.CACHES["redis"]["LOCATION"]
    alias = use_cache_store(settings, location, KEY_PREFIX=prefix)
    client = raw_client(alias)
    yield client, prefix
    delete_keys(client, prefix)


@pytest.mark.redis
@pytest.mark.parametrize("url", ["/lease/", "/async/"])
def test_cache_store_records_are_unreadable_in_redis_and_replayed_byte_for_byte(
    settings, cache_store, url
):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]
    client, prefix = cache_store
    key = new_key()

    first = post(url, key)
    replay = post(url, key)

    assert_same_answer(replay, first)
    assert ran == [url]
    (name,) = client.scan_iter(match=f"{prefix}:*")
    raw = client.get(name)
    assert_no_plaintext(raw)
    assert SEALED_HEADER.encode() in raw


@pytest.mark.redis
def test_cache_store_record_no_key_can_decrypt_is_answered_503(settings, cache_store):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD_KEY]
    key = new_key()
    post("/lease/", key)
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]

    assert_problem(post("/lease/", key), 503, "idempotency_store_unavailable")
    assert ran == ["/lease/"]


# -- The redaction hook ---------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("keys", [[], [NEW_KEY]], ids=["clear", "encrypted"])
def test_redaction_changes_what_is_stored_and_so_what_replays_get(settings, keys):
    settings.IDEMPOTENCY_REDACT = f"{__name__}.redact"
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = keys
    key = new_key()

    first = post("/atomic/", key)
    replay = post("/atomic/", key)

    assert json.loads(first.content)["card"] == CARD  # the first answer is the view's own
    assert first["X-Card-Holder"] == HOLDER
    assert json.loads(replay.content) == {"card": "**** 4242", "holder": HOLDER, "amount": 7}
    assert not replay.has_header("X-Card-Holder")
    assert replay["Location"] == LOCATION
    assert redacted_for == ["/atomic/"]  # once, when storing, with the request
    body, headers = raw_row(key)
    assert CARD.encode() not in body
    assert "X-Card-Holder" not in headers


@pytest.mark.django_db
def test_redaction_gets_none_for_a_function(settings):
    settings.IDEMPOTENCY_REDACT = f"{__name__}.redact"

    card_of(HOLDER, idempotency_key="card-redacted")

    assert card_of(HOLDER, idempotency_key="card-redacted")["card"] == "**** 4242"
    assert redacted_for == [None]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "hook",
    [
        "failing_redact",
        "wrong_status_redact",
        # Headers no replay can send: were stored, and every retry was a 500 (Django's
        # BadHeaderError) or a 503 (taken for an encrypted response it cannot open).
        "newline_header_redact",
        "sealed_name_redact",
    ],
)
def test_a_broken_redaction_hook_stores_nothing_of_the_response(settings, caplog, hook):
    settings.IDEMPOTENCY_REDACT = f"{__name__}.{hook}"
    key = new_key()

    first = post("/atomic/", key)
    again = post("/atomic/", key)

    assert first.status_code == 201
    assert_problem(again, 409, "idempotency_response_not_stored")
    assert ran == ["/atomic/"]
    row = IdempotencyKey.objects.get(key=key)
    assert row.response_body is None
    assert row.response_headers == []
    assert "IDEMPOTENCY_REDACT" in caplog.text


# -- The admin ------------------------------------------------------------------------------


def change_page(client, key: str) -> str:
    pk = IdempotencyKey.objects.get(key=key).pk
    url = reverse("admin:django_idempotency_idempotencykey_change", args=[pk])
    response = client.get(url)
    assert response.status_code == 200
    return response.content.decode()


@pytest.mark.django_db
def test_the_admin_shows_an_encrypted_response_decrypted(settings, admin_client):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY, OLD_KEY]
    key = new_key()
    post("/atomic/", key)

    page = change_page(admin_client, key)

    assert CARD in page
    assert LOCATION in page
    assert "X-Card-Holder" in page
    assert SEALED_HEADER not in page
    assert "can decrypt" not in page


@pytest.mark.django_db
def test_the_admin_never_shows_ciphertext_it_cannot_decrypt(settings, admin_client):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD_KEY]
    key = new_key()
    post("/atomic/", key)
    row = IdempotencyKey.objects.get(key=key)
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]

    page = change_page(admin_client, key)

    assert page.count("Encrypted: no key in IDEMPOTENCY_ENCRYPTION_KEYS can decrypt it.") == 2
    assert bytes(row.response_body)[40:80].decode() not in page
    assert row.response_headers[0][1][40:80] not in page
    assert CARD not in page
    assert "201 Created" in page  # the status is stored in clear


# -- Settings and their checks --------------------------------------------------------------


def _messages(check_id: str) -> list[str]:
    return [message.msg for message in check_settings() if message.id == check_id]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (OLD_KEY, "must be a list or tuple of Fernet keys, not a str"),
        ([NEW_KEY, OLD_KEY[:-4]], "holds at position 1 a value that is not a Fernet key"),
        ([NEW_KEY, "not base64 at all!"], "holds at position 1 a value that is not a Fernet"),
        ([42], "holds at position 0 a value (a int) that is not a Fernet key"),
    ],
    ids=["a-single-key", "short", "not-base64", "not-text"],
)
def test_e022_a_key_that_is_not_a_fernet_key_is_refused_without_showing_it(
    settings, value, problem
):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = value

    (message,) = _messages("django_idempotency.E022")

    assert message.startswith("IDEMPOTENCY_ENCRYPTION_KEYS ")
    assert problem in message
    assert OLD_KEY[:-4] not in message
    assert "not base64" not in message


def test_e022_keys_as_text_or_bytes_pass(settings):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = (NEW_KEY, OLD_KEY.encode())

    assert [m for m in check_settings() if m.id.endswith(("E022", "E023"))] == []


def test_e023_keys_without_the_cryptography_library(settings, monkeypatch):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]
    monkeypatch.setitem(sys.modules, "cryptography", None)  # as if not installed

    (message,) = _messages("django_idempotency.E023")

    assert "cryptography library" in message
    assert NEW_KEY not in message


def test_e023_is_silent_without_keys(settings, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography", None)

    assert _messages("django_idempotency.E023") == []


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("tests.nowhere.redact", "cannot be imported"),
        (f"{__name__}.NOT_CALLABLE", "which is not callable"),
        (redact, "must be None or a dotted path, not a function"),
    ],
)
def test_e024_a_redaction_hook_that_does_not_import_or_is_not_callable(settings, value, problem):
    settings.IDEMPOTENCY_REDACT = value

    (message,) = _messages("django_idempotency.E024")

    assert message.startswith("IDEMPOTENCY_REDACT ")
    assert problem in message


def test_the_check_command_fails_on_a_bad_key(settings):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = ["short"]

    with pytest.raises(SystemCheckError, match=r"django_idempotency\.E022"):
        call_command("check")


@pytest.mark.django_db
def test_the_status_command_never_shows_the_keys(settings):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY, OLD_KEY]
    out = StringIO()

    call_command("idempotency_status", "--json", stdout=out)

    report = json.loads(out.getvalue())
    assert report["settings"]["IDEMPOTENCY_ENCRYPTION_KEYS"]["repr"] == "<2 keys, not shown>"
    assert report["settings"]["IDEMPOTENCY_ENCRYPTION_KEYS"]["default"] is False
    assert NEW_KEY not in out.getvalue()
    assert OLD_KEY not in out.getvalue()


# -- Sealed responses that were tampered with -------------------------------------------------


def _envelope(**changes) -> str:
    envelope = {"v": 1, "for": digest(["anonymous", "k"]), "headers": [], "body": None}
    envelope.update(changes)
    return fernet.Fernet(NEW_KEY).encrypt(json.dumps(envelope).encode()).decode()


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        ("é", None, "not a readable envelope"),
        (fernet.Fernet(NEW_KEY).encrypt(b"\xff not json").decode(), None, "not a readable"),
        (fernet.Fernet(NEW_KEY).encrypt(b"[1]").decode(), None, "not a readable envelope"),
        (_envelope(v=2), None, "not a readable envelope"),
        (_envelope(body="0" * 64), fernet.Fernet(NEW_KEY).encrypt(b"other"), "not the one stored"),
        (_envelope(body="0" * 64), None, "its body is missing"),
        ("gAAAAA-not-a-token", None, "no key in IDEMPOTENCY_ENCRYPTION_KEYS can decrypt it"),
    ],
    ids=["not-ascii", "not-json", "not-an-object", "version", "swapped-body", "no-body", "junk"],
)
def test_a_tampered_sealed_response_is_unreadable(settings, headers, body, reason):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]
    sealed = StoredResponse(status=201, headers=[(SEALED_HEADER, headers)], body=body)

    with pytest.raises(Unreadable, match=reason):
        open_response(sealed, scope="anonymous", key="k")


def test_a_sealed_response_without_a_body_opens_without_one(settings):
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW_KEY]
    response = StoredResponse(status=201, headers=[("Location", LOCATION)], body=None)

    sealed = seal(response, scope="anonymous", key="k")

    assert sealed.body is None
    assert LOCATION not in str(sealed.headers)
    assert open_response(sealed, scope="anonymous", key="k") == response
