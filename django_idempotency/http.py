"""HTTP for the protocol: read a request's key, scope and fingerprint, and build its responses.

What a Django request means to the protocol (:func:`read_claim`) and how its answers look
(problem+json errors, byte-for-byte replays, what of a response is stored). No state: the run
itself is :mod:`django_idempotency.lifecycle`'s.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from datetime import timedelta
from io import BytesIO
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.http import HttpRequest, HttpResponse, QueryDict
from django.http.multipartparser import MultiPartParserError
from django.http.response import HttpResponseBase
from django.utils.http import http_date

from django_idempotency.conf import (
    conf,
    get_fingerprint_function,
    get_scope_function,
)
from django_idempotency.exceptions import (
    IdempotencyError,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyRequestInvalid,
)
from django_idempotency.records import ClaimRequest, StoredResponse, digest

_Value = TypeVar("_Value")

MAX_KEY_LENGTH = 255
REPLAYED_HEADER = "Idempotent-Replayed"
#: When a stored answer's key expires: computed for each answer, never stored.
EXPIRES_HEADER = "Idempotency-Key-Expires"

# Never stored, never replayed: cookies belong to the first caller's session, hop-by-hop
# headers to its connection, Date to the moment of the first answer, and the key's expiry is
# read afresh for each answer.
NEVER_STORED_HEADERS = frozenset(
    {
        "set-cookie",
        "date",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        REPLAYED_HEADER.lower(),
        EXPIRES_HEADER.lower(),
    }
)


def read_claim(
    request: Any, *, methods: frozenset[str], required: bool, ttl: timedelta
) -> ClaimRequest | None:
    """The claim ``request`` makes, or ``None`` when it makes none: its method is not one of
    ``methods``, or it has no key and none is ``required``.

    Checks in the contract's order: the key, the path, the body (read for the fingerprint,
    then its length), then the scope. Raises :class:`IdempotencyError` for a request that
    cannot be claimed. ``request`` is Django's, or DRF's ``Request`` wrapping it.
    """
    if request.method not in methods:
        return None
    raw_key = request.headers.get(conf.IDEMPOTENCY_HEADER)
    if raw_key is None:
        if required:
            raise IdempotencyKeyMissing()
        return None
    key = parse_key(raw_key)
    http_request = getattr(request, "_request", request)  # a DRF Request wraps Django's
    if not storable(http_request.path):
        raise IdempotencyRequestInvalid(IdempotencyRequestInvalid.unstorable_path_detail)
    fingerprint = fit(get_fingerprint_function()(http_request), 64)
    check_body_complete(http_request)
    return ClaimRequest(
        scope=fit(get_scope_function()(request), MAX_KEY_LENGTH),
        key=key,
        fingerprint=fingerprint,
        method=http_request.method,
        path=http_request.path[:2048],
        token=uuid.uuid4().hex,
        ttl=ttl,
    )


# -- The key, the scope and the fingerprint ------------------------------------------------


def parse_key(raw: str) -> str:
    """The key named by an ``Idempotency-Key`` header value.

    Accepts a Structured Field string (``"abc"``, as the IETF draft says) or a bare value
    (``abc``, as Stripe's clients send it). Raises :class:`IdempotencyKeyInvalid` for an empty,
    over-long or non-printable value, and for more than one value (repeated headers arrive
    joined by commas).
    """
    value = raw.strip(" \t")
    if value.startswith('"'):
        key = _parse_sf_string(value)
    else:
        key = value
        if "," in key or not _printable(key):
            raise IdempotencyKeyInvalid()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid()
    return key


def _parse_sf_string(value: str) -> str:
    chars: list[str] = []
    index = 1
    while index < len(value):
        char = value[index]
        if char == "\\":
            index += 1
            if index == len(value) or value[index] not in '"\\':
                raise IdempotencyKeyInvalid()
            chars.append(value[index])
        elif char == '"':
            if index != len(value) - 1:  # parameters, or a second value
                raise IdempotencyKeyInvalid()
            return "".join(chars)
        elif not _printable(char):
            raise IdempotencyKeyInvalid()
        else:
            chars.append(char)
        index += 1
    raise IdempotencyKeyInvalid()  # no closing quote


def _printable(text: str) -> bool:
    return all(" " <= char <= "~" for char in text)


def user_scope(request: HttpRequest) -> str:
    """The default ``IDEMPOTENCY_SCOPE``: ``user:<pk>`` when authenticated, else ``anonymous``."""
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return "anonymous"


def request_fingerprint(request: HttpRequest) -> str:
    """The default ``IDEMPOTENCY_FINGERPRINT``: a SHA-256 of the request's meaning.

    Covers the method, the path, the query string (order of parameters ignored, the order of
    a repeated parameter's values kept) and the body. A JSON body is re-encoded canonically
    (numbers kept as written), a form body's fields are sorted by name, a multipart body is
    read as fields and files, so key order, whitespace, escapes, field order and the
    multipart boundary do not matter. A ``charset`` other than UTF-8 in the Content-Type
    changes how Django and DRF decode the query and body, so it is part of the fingerprint.
    """
    charset = _charset(request)
    query = _sorted_pairs(_parse_pairs(request.META.get("QUERY_STRING", ""), charset))
    parts: list[Any] = [request.method, request.path, query]
    if charset != "utf-8":
        parts.append(charset)  # only then: UTF-8 requests keep the fingerprints they had
    head = json.dumps(parts, ensure_ascii=False)
    digest = hashlib.sha256(head.encode("utf-8", "surrogatepass"))
    kind, body = _canonical_body(request, charset)
    digest.update(b"\0" + kind.encode() + b"\0")
    digest.update(body)
    return digest.hexdigest()


def _charset(request: HttpRequest) -> str:
    """The codec Django decodes the request's query and form body with (and DRF its JSON
    body): the Content-Type's valid charset, else DEFAULT_CHARSET; by its canonical name.

    Django keeps any charset that ``codecs`` knows, including codecs that are not text
    encodings (``base64``, ``zlib``): such a request cannot be decoded, by the view either.
    """
    name = request.encoding or settings.DEFAULT_CHARSET
    try:
        info = codecs.lookup(name)
    except LookupError:  # pragma: no cover - Django keeps only charsets that codecs knows
        return name.lower()
    # How bytes.decode() itself tells a bytes-to-bytes codec, which it refuses.
    if not getattr(info, "_is_text_encoding", True):
        raise IdempotencyRequestInvalid(IdempotencyRequestInvalid.charset_detail)
    return info.name


def _parse_pairs(text: str, charset: str = "utf-8") -> list[tuple[str, str]]:
    """A query string's or form body's pairs, within Django's DATA_UPLOAD_MAX_NUMBER_FIELDS."""
    try:
        return parse_qsl(
            text,
            keep_blank_values=True,
            encoding=charset,
            errors="surrogateescape",
            max_num_fields=settings.DATA_UPLOAD_MAX_NUMBER_FIELDS,
        )
    except ValueError as exc:  # more fields than allowed: Django's QueryDict refuses it too
        raise IdempotencyRequestInvalid() from exc


def _sorted_pairs(pairs: Iterable[tuple[str, _Value]]) -> list[tuple[str, _Value]]:
    return sorted(pairs, key=lambda pair: pair[0])  # stable: a repeated name keeps its order


def _canonical_body(request: HttpRequest, charset: str = "utf-8") -> tuple[str, bytes]:
    content_type = request.content_type or ""
    try:
        if content_type == "multipart/form-data":
            return "multipart", _canonical_multipart(request)
        body = request.body
    except (SuspiciousOperation, MultiPartParserError) as exc:
        # Over DATA_UPLOAD_MAX_MEMORY_SIZE or too many fields, or a broken multipart body:
        # the view could not read it either.
        raise IdempotencyRequestInvalid() from exc
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            # DRF decodes with the charset; json.loads(bytes) detects UTF-8, -16 and -32.
            data = _loads(body if charset == "utf-8" else body.decode(charset))
            text = _canonical_json(data)
        except (ValueError, RecursionError):
            return "raw", body  # not JSON after all: the view decides what to answer
        return "json", text.encode("utf-8", "surrogatepass")
    if content_type == "application/x-www-form-urlencoded":
        text = body.decode("ascii", "surrogateescape")  # percent-escapes decode per charset
        encoded = json.dumps(_sorted_pairs(_parse_pairs(text, charset)), ensure_ascii=True)
        return "form", encoded.encode()
    return "raw", body


class _Number(str):
    """A JSON number as written: ``0.1`` and ``0.10000000000000001`` are different requests
    to a view that parses numbers as ``Decimal``, though they are one float."""


def _loads(text: str | bytes) -> Any:
    return json.loads(text, parse_float=_Number, parse_int=_Number, parse_constant=_Number)


def _canonical_json(value: Any) -> str:
    """``value`` re-encoded with sorted keys, no whitespace and its numbers as written."""
    if isinstance(value, _Number):
        text = str(value)
        if "e" in text or "E" in text:
            # One spelling of the exponent (1E5, 1e+5 and 1e05 are one number to every
            # parser); the mantissa as written (1.0e5 is not 1e5 to Decimal).
            mantissa, _, exponent = text.lower().partition("e")
            return f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(f"{_string(k)}:{_canonical_json(v)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_canonical_json(item) for item in value) + "]"
    if isinstance(value, str):
        return _string(value)
    return json.dumps(value)  # true, false, null


def _string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _canonical_multipart(request: HttpRequest) -> bytes:
    data: QueryDict
    if request.method == "POST":
        # Parsed from the stream (files spill to disk), and kept for the view.
        data, uploads = request.POST, request.FILES
    else:
        # Django parses request.POST/FILES for POST only: read a PATCH's or PUT's body here.
        data, uploads = request.parse_file_upload(request.META, BytesIO(request.body))
    fields = [(name, value) for name in data for value in data.getlist(name)]
    files = []
    for name in uploads:
        for upload in uploads.getlist(name):
            digest = hashlib.sha256()
            for chunk in upload.chunks():
                digest.update(chunk)
            upload.seek(0)
            files.append((name, [upload.name, upload.content_type, digest.hexdigest()]))
    return json.dumps([_sorted_pairs(fields), _sorted_pairs(files)]).encode()


# -- Responses ------------------------------------------------------------------------------


def error_response(exc: IdempotencyError) -> HttpResponse:
    """The RFC 9457 problem+json response for an error of this layer. Never stored."""
    response = HttpResponse(
        json.dumps(exc.problem()),
        status=exc.status_code,
        content_type="application/problem+json",
    )
    for name, value in exc.headers.items():
        response[name] = value
    return response


def replay_response(stored: StoredResponse, expires_in: float | None = None) -> HttpResponse:
    """The stored response, byte for byte, marked ``Idempotent-Replayed: true``, with its
    key's expiry ``expires_in`` seconds from now (see :func:`add_expiry`)."""
    assert stored.body is not None
    response = HttpResponse(stored.body, status=stored.status)
    del response["Content-Type"]  # the stored headers carry the original one, if any
    for name, value in stored.headers:
        response[name] = value
    response[REPLAYED_HEADER] = "true"
    add_expiry(response, expires_in)
    return response


def add_expiry(response: HttpResponseBase, expires_in: float | None) -> None:
    """Send when the key of a stored answer (the first one, or a replay) expires, as an
    HTTP-date ``expires_in`` seconds from now; nothing when that is unknown (``None``)."""
    if expires_in is not None:
        response[EXPIRES_HEADER] = http_date(time.time() + expires_in)


def render(request: Any, response: HttpResponseBase) -> None:
    """Render a lazily rendered response (a ``TemplateResponse``, a DRF ``Response``)."""
    if getattr(response, "is_rendered", True):
        return
    # A DRF Response returned under @api_view has no renderer until DRF's view finalizes it;
    # the request knows that view, and finalizing twice is harmless.
    view = (getattr(request, "parser_context", None) or {}).get("view")
    if view is not None and getattr(response, "accepted_renderer", None) is None:
        view.finalize_response(request, response)
    response.render()  # type: ignore[attr-defined]


def is_stored_status(status: int, statuses: frozenset[str | int] | None = None) -> bool:
    """Whether a returned response with ``status`` is stored: the storing rule, in one place.

    ``statuses`` is a view's own ``stored_statuses`` option (validated, classes lower-cased);
    ``None`` follows ``IDEMPOTENCY_STORED_STATUSES``, and when that is ``None`` too, the
    default rule: every status but a 5xx, and a 5xx as well under
    ``IDEMPOTENCY_STORE_SERVER_ERRORS``.
    """
    if statuses is None:
        statuses = conf.IDEMPOTENCY_STORED_STATUSES
    if statuses is None:
        return status < 500 or conf.IDEMPOTENCY_STORE_SERVER_ERRORS
    return status in statuses or f"{status // 100}xx" in statuses


def stored_response(
    response: HttpResponseBase, statuses: frozenset[str | int] | None = None
) -> StoredResponse | None:
    """What to store for a returned response; ``None`` when it must not be stored (its status
    is not stored under :func:`is_stored_status`, with a view's ``statuses``)."""
    if not is_stored_status(response.status_code, statuses):
        return None
    headers = [
        (name, value)
        for name, value in response.items()
        if name.lower() not in NEVER_STORED_HEADERS
    ]
    body: bytes | None = None
    if not response.streaming:
        content = response.content  # type: ignore[attr-defined]
        if len(content) <= conf.IDEMPOTENCY_MAX_RESPONSE_SIZE:
            body = bytes(content)
    return StoredResponse(status=response.status_code, headers=headers, body=body)


# -- Text every database can store ---------------------------------------------------------


def fit(value: str, length: int) -> str:
    """A custom scope or fingerprint too long for its column, or holding text no database
    can store (NUL, lone surrogates: a scope made of a header, say), replaced by its digest."""
    if len(value) <= length and storable(value):
        return value
    return digest(value)


def storable(text: str) -> bool:
    """Whether every database can store ``text``: PostgreSQL's text holds no NUL, and no
    database's UTF-8 holds a lone surrogate."""
    if "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_body_complete(request: HttpRequest) -> None:
    """Refuse a body shorter than its Content-Length (a client or proxy that gave up half
    way): the view would run on the part that arrived, and its answer would be stored."""
    try:
        expected = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return  # Django reads such a body as empty, and so did the fingerprint
    if expected <= 0:
        return
    body = getattr(request, "_body", None)  # read already, by the fingerprint or the view
    if isinstance(body, bytes):
        received = len(body)
    elif request.content_type == "multipart/form-data":
        # A POST's multipart body is parsed from the stream (files spill to disk), which
        # Django's parser reads to its end: what it read is all that came. Known only once the
        # body was parsed (the default fingerprint does); never read into memory here.
        stream = getattr(request, "_stream", None)
        position = getattr(stream, "_pos", None)
        if not hasattr(request, "_files") or not isinstance(position, int):
            return
        received = position
    else:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and expected > limit:
            # Not read by the fingerprint (a custom one): a large upload the view streams.
            # Reading it here would refuse it as too large.
            return
        try:
            received = len(request.body)
        except (SuspiciousOperation, MultiPartParserError) as exc:
            raise IdempotencyRequestInvalid() from exc
    if received < expected:
        raise IdempotencyRequestInvalid(IdempotencyRequestInvalid.truncated_detail)
