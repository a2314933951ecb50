"""What is kept of a response at rest: the redaction hook, then encryption of its headers and body.

:func:`for_storage` turns the response a run is about to store into what every store keeps
(``IDEMPOTENCY_REDACT``, then ``IDEMPOTENCY_ENCRYPTION_KEYS``); :func:`opened` turns a
completed record found for a replay back into the response to send. Stores and the replay
cache only ever see the sealed form, so none of them encrypts anything itself; the admin opens
it with :func:`open_response` to show it.

A sealed response keeps its status in clear. Its headers become one entry,
``(":encrypted", token)``, whose Fernet token holds the real headers, a digest of the body and
the (scope, key) it was stored for; its body (when one was stored) becomes a Fernet token of
its own. The entry's name cannot be a real header's (``:`` is not allowed in a field name),
so a response stored before encryption was turned on is told apart and replayed as it is.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string
from django.utils.translation import gettext_lazy as _

from django_idempotency.conf import InvalidValue, conf
from django_idempotency.exceptions import IdempotencyStoreUnavailable
from django_idempotency.records import ClaimRequest, Record, StoredResponse, digest

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

logger = logging.getLogger("django_idempotency")

#: The name of the one header entry a sealed response keeps.
SEALED_HEADER = ":encrypted"
#: The layout of the sealed headers' envelope.
VERSION = 1
#: How long a client is asked to wait before retrying a replay that cannot be decrypted: an
#: operator has to put the key back, which a retry a second later will not see.
UNREADABLE_RETRY_AFTER = 60

#: The detail of the 503 answered for a stored response that cannot be decrypted.
UNREADABLE_DETAIL = _(
    "The stored response to this idempotency key cannot be read right now, so it was not "
    "replayed, and the request was not processed again. Retry after the time given in the "
    "Retry-After header."
)

# The hint of E022: how to make a key.
_GENERATE_HINT = (
    "Generate a key with: python -c "
    '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
)


class Unreadable(Exception):
    """A sealed response that cannot be opened with the configured keys (the reason says why)."""


# -- Settings -------------------------------------------------------------------------------


def validate_keys(value: object) -> None:
    """``IDEMPOTENCY_ENCRYPTION_KEYS``: a list or tuple of Fernet keys (32 bytes, URL-safe
    base64, as ``str`` or ``bytes``). The message names a key by its position, never its text."""
    if not isinstance(value, (list, tuple)):
        raise InvalidValue(
            f"must be a list or tuple of Fernet keys, not a {type(value).__name__}.",
            hint="Put a single key in a list: [key]. " + _GENERATE_HINT,
        )
    for position, item in enumerate(value):
        if not _is_fernet_key(item):
            kind = "" if isinstance(item, (str, bytes)) else f" (a {type(item).__name__})"
            raise InvalidValue(
                f"holds at position {position} a value{kind} that is not a Fernet key: 32 "
                "bytes in URL-safe base64, 44 characters. The value is not shown.",
                hint=_GENERATE_HINT,
            )


def _is_fernet_key(item: object) -> bool:
    if not isinstance(item, (str, bytes)):
        return False
    try:
        return len(base64.urlsafe_b64decode(item)) == 32  # as Fernet() decodes it
    except (binascii.Error, ValueError):
        return False


def cryptography_installed() -> bool:
    return find_spec("cryptography") is not None


def validate_redact(value: object) -> None:
    """``IDEMPOTENCY_REDACT``: ``None``, or the dotted path of a callable."""
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidValue(f"must be None or a dotted path, not a {type(value).__name__}.")
    try:
        found = import_string(value)
    except ImportError as exc:
        raise InvalidValue(f"names {value!r}, which cannot be imported: {exc}") from None
    if not callable(found):
        raise InvalidValue(
            f"names {value!r}, which is not callable.",
            hint="It takes (request, response) and returns a StoredResponse; see docs/privacy.md.",
        )


@functools.cache
def _fernet() -> MultiFernet | None:
    """The configured keys as one ``MultiFernet`` (the first encrypts, any decrypts), or
    ``None`` without keys."""
    keys = conf.IDEMPOTENCY_ENCRYPTION_KEYS
    if not keys:
        return None
    # Only with keys: cryptography is the optional `encryption` extra.
    from cryptography.fernet import Fernet, MultiFernet

    return MultiFernet([Fernet(key) for key in keys])


@functools.cache
def _redact_function() -> Callable[[Any, StoredResponse], StoredResponse] | None:
    path = conf.IDEMPOTENCY_REDACT
    if path is None:
        return None
    function: Callable[[Any, StoredResponse], StoredResponse] = import_string(path)
    return function


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "IDEMPOTENCY_ENCRYPTION_KEYS":
        _fernet.cache_clear()
    elif setting == "IDEMPOTENCY_REDACT":
        _redact_function.cache_clear()


# -- Storing --------------------------------------------------------------------------------


def for_storage(response: StoredResponse, claim: ClaimRequest, request: Any) -> StoredResponse:
    """What the store keeps of ``response``: redacted by ``IDEMPOTENCY_REDACT`` (called with
    ``request``, ``None`` for a function or a task), then sealed with the first key of
    ``IDEMPOTENCY_ENCRYPTION_KEYS``. Unchanged when neither is set."""
    return seal(redact(response, request), scope=claim.scope, key=claim.key)


def redact(response: StoredResponse, request: Any) -> StoredResponse:
    """``response`` as ``IDEMPOTENCY_REDACT`` returns it.

    A hook that raises, or returns anything but a ``StoredResponse`` of the same status with
    ``(str, str)`` headers (without CR or LF, none named ``:encrypted``) and a ``bytes`` (or
    ``None``) body, stores nothing of the response (no headers, no body: retries get
    ``409 idempotency_response_not_stored``), and the error is logged: what it should have
    removed is never stored by mistake.
    """
    function = _redact_function()
    if function is None:
        return response
    try:
        redacted = function(request, response)
    except Exception:
        logger.exception(
            "IDEMPOTENCY_REDACT raised: the response is stored without headers or body."
        )
        return _nothing_of(response)
    if not _is_response_of(redacted, response.status):
        logger.error(
            "IDEMPOTENCY_REDACT returned %s, not a StoredResponse of status %d with (str, str) "
            "headers that a replay can send and a bytes or None body: the response is stored "
            "without headers or body.",
            type(redacted).__name__,
            response.status,
        )
        return _nothing_of(response)
    return redacted


def _nothing_of(response: StoredResponse) -> StoredResponse:
    return StoredResponse(status=response.status, headers=[], body=None)


_NEWLINES = frozenset("\r\n")


def _is_response_of(value: object, status: int) -> bool:
    return (
        isinstance(value, StoredResponse)
        and value.status == status
        and isinstance(value.headers, (list, tuple))
        and all(
            isinstance(header, (list, tuple))
            and len(header) == 2
            and all(isinstance(part, str) for part in header)
            # What a replay can send: Django refuses a CR or LF (every replay was a 500), and
            # a header named ":encrypted" made the response unreadable (every replay a 503).
            and not _NEWLINES.intersection(header[0] + header[1])
            and header[0] != SEALED_HEADER
            for header in value.headers
        )
        and (value.body is None or isinstance(value.body, bytes))
    )


def seal(response: StoredResponse, *, scope: str, key: str) -> StoredResponse:
    """``response`` encrypted for the key (``scope``, ``key``); unchanged without keys."""
    fernet = _fernet()
    if fernet is None:
        return response
    envelope = {
        "v": VERSION,
        "for": digest([scope, key]),
        "headers": [[name, value] for name, value in response.headers],
        "body": None if response.body is None else hashlib.sha256(response.body).hexdigest(),
    }
    sealed_headers = fernet.encrypt(json.dumps(envelope).encode()).decode("ascii")
    body = None if response.body is None else fernet.encrypt(response.body)
    return StoredResponse(
        status=response.status, headers=[(SEALED_HEADER, sealed_headers)], body=body
    )


# -- Replaying ------------------------------------------------------------------------------


def is_sealed(response: StoredResponse) -> bool:
    headers = response.headers
    return len(headers) == 1 and headers[0][0] == SEALED_HEADER


def open_response(response: StoredResponse, *, scope: str, key: str) -> StoredResponse:
    """``response`` as it was before :func:`seal`; a response that was stored unsealed is
    returned as it is. Raises :class:`Unreadable` when no configured key can open it, or when
    it was sealed for another key (a row copied from another key's)."""
    if not is_sealed(response):
        return response
    fernet = _fernet()
    if fernet is None:
        raise Unreadable("it is encrypted, and IDEMPOTENCY_ENCRYPTION_KEYS is empty")
    try:
        envelope = json.loads(_decrypt(fernet, response.headers[0][1].encode("ascii")))
    except (UnicodeEncodeError, ValueError):
        raise Unreadable("its headers are not a readable envelope") from None
    if not isinstance(envelope, dict) or envelope.get("v") != VERSION:
        raise Unreadable("its headers are not a readable envelope")
    if envelope.get("for") != digest([scope, key]):
        raise Unreadable("it was encrypted for another key")
    body = None
    if response.body is not None:
        body = _decrypt(fernet, bytes(response.body))
        if hashlib.sha256(body).hexdigest() != envelope.get("body"):
            raise Unreadable("its body is not the one stored with its headers")
    elif envelope.get("body") is not None:
        raise Unreadable("its body is missing")
    headers = [(str(name), str(value)) for name, value in envelope["headers"]]
    return StoredResponse(status=response.status, headers=headers, body=body)


def _decrypt(fernet: MultiFernet, token: bytes) -> bytes:
    # Only reached with keys, so cryptography is installed: the optional `encryption` extra.
    from cryptography.fernet import InvalidToken

    try:
        return fernet.decrypt(token)
    except InvalidToken:
        raise Unreadable(
            "no key in IDEMPOTENCY_ENCRYPTION_KEYS can decrypt it (was its key removed?)"
        ) from None


def opened(record: Record, claim: ClaimRequest) -> Record:
    """A completed ``record`` found for ``claim``, with its response decrypted for the replay.

    One that cannot be decrypted is never replayed (and its work never run again): the error
    is logged, and the client is answered ``503 idempotency_store_unavailable``.
    """
    assert record.response is not None
    try:
        response = open_response(record.response, scope=claim.scope, key=claim.key)
    except Unreadable as exc:
        logger.error(
            "The stored response of idempotency key %r (scope %r) cannot be replayed: %s.",
            claim.key,
            claim.scope,
            exc,
        )
        raise IdempotencyStoreUnavailable(
            UNREADABLE_DETAIL, retry_after=UNREADABLE_RETRY_AFTER
        ) from None
    if response is record.response:
        return record
    return dataclasses.replace(record, response=response)
