"""The framework-neutral engine: read the key, fingerprint the request, claim, store, replay.

Adapters (the decorator, the DRF mixin) only translate between their framework and
:class:`Execution`; every decision about a request is made here.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import heapq
import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from io import BytesIO
from types import TracebackType
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections
from django.db import transaction as db_transaction
from django.http import HttpRequest, HttpResponse, QueryDict
from django.http.multipartparser import MultiPartParserError
from django.http.response import HttpResponseBase

from django_idempotency import signals
from django_idempotency.checks import ensure_valid_settings
from django_idempotency.conf import (
    SAFE_METHODS,
    InvalidValue,
    conf,
    describe,
    get_fingerprint_function,
    get_scope_function,
    get_store,
    validate_bool,
    validate_duration,
    validate_methods,
)
from django_idempotency.exceptions import (
    IdempotencyError,
    IdempotencyKeyInProgress,
    IdempotencyKeyInvalid,
    IdempotencyKeyMismatch,
    IdempotencyKeyMissing,
    IdempotencyLeaseLost,
    IdempotencyResponseNotStored,
    RequestInvalid,
    StoreUnavailable,
)
from django_idempotency.records import ClaimRequest, Record, StoredResponse, digest
from django_idempotency.stores import KeyLocked, PhasedStore, Store

logger = logging.getLogger("django_idempotency")

_Value = TypeVar("_Value")
_Run = TypeVar("_Run", bound="Run")

MAX_KEY_LENGTH = 255
REPLAYED_HEADER = "Idempotent-Replayed"

# Never stored, never replayed: cookies belong to the first caller's session, hop-by-hop
# headers to its connection, and Date to the moment of the first answer.
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
    }
)


def _validate_ttl(value: object, name: str) -> timedelta:
    return validate_duration(value, assign=f"{name}=", zero_allowed=False)


def _validate_wait(value: object, name: str) -> timedelta:
    return validate_duration(value, assign=f"{name}=", zero_allowed=True)


def _validate_view_methods(value: object, name: str) -> frozenset[str]:
    methods = validate_methods(value)
    if not methods - SAFE_METHODS:
        # The setting may be empty (every view then names its own); a view's own list that
        # covers nothing can only be a mistake that leaves the view unprotected.
        raise InvalidValue(
            f"must name at least one method to cover, not {describe(value)}: safe methods "
            f"({', '.join(sorted(SAFE_METHODS))}) are never covered, so the view would not "
            "be protected.",
            hint='For example ("POST", "PATCH").',
        )
    return methods


_OPTION_VALIDATORS: dict[str, Callable[[object, str], object]] = {
    "required": lambda value, name: validate_bool(value),
    "ttl": _validate_ttl,
    "methods": _validate_view_methods,
    "atomic": lambda value, name: validate_bool(value),
    "wait": _validate_wait,
}


def option_error(owner: str, name: str, exc: InvalidValue) -> ImproperlyConfigured:
    """The error for the option ``name`` of ``owner`` (a view, a function, a task)."""
    hint = f" {exc.hint}" if exc.hint else ""
    return ImproperlyConfigured(f"{owner}: {name} {exc.problem}{hint}")


@dataclass(frozen=True)
class Options:
    """Per-view options; ``None`` means "use the setting".

    Each value is validated when the options are made, by the validators the settings'
    checks use: an adapter makes them when it wraps the view (at import, or at ``as_view()``),
    so a wrong type or value is an ``ImproperlyConfigured`` naming the view and the option
    there, never an error at request time. ``methods`` is kept as a frozenset, upper-cased.
    """

    required: bool | None = None
    ttl: timedelta | None = None
    methods: Iterable[str] | None = None
    atomic: bool | None = None
    wait: timedelta | None = None
    #: For error messages: what the options belong to ("@idempotent on shop.views.pay"), and
    #: how its options are spelled ("idempotency_" for the mixin's attributes).
    owner: str = field(default="Options", compare=False, repr=False)
    prefix: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, validate in _OPTION_VALIDATORS.items():
            value = getattr(self, name)
            if value is None:
                continue
            spelled = self.prefix + name
            try:
                object.__setattr__(self, name, validate(value, spelled))
            except InvalidValue as exc:
                raise option_error(self.owner, spelled, exc) from None

    @property
    def covered_methods(self) -> frozenset[str]:
        methods = conf.IDEMPOTENCY_METHODS if self.methods is None else self.methods
        return frozenset(method.upper() for method in methods) - SAFE_METHODS


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
        raise RequestInvalid(RequestInvalid.charset_detail)
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
        raise RequestInvalid() from exc


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
        raise RequestInvalid() from exc
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


def replay_response(stored: StoredResponse) -> HttpResponse:
    """The stored response, byte for byte, marked ``Idempotent-Replayed: true``."""
    assert stored.body is not None
    response = HttpResponse(stored.body, status=stored.status)
    del response["Content-Type"]  # the stored headers carry the original one, if any
    for name, value in stored.headers:
        response[name] = value
    response[REPLAYED_HEADER] = "true"
    return response


def _render(request: Any, response: HttpResponseBase) -> None:
    """Render a lazily rendered response (a ``TemplateResponse``, a DRF ``Response``)."""
    if getattr(response, "is_rendered", True):
        return
    # A DRF Response returned under @api_view has no renderer until DRF's view finalizes it;
    # the request knows that view, and finalizing twice is harmless.
    view = (getattr(request, "parser_context", None) or {}).get("view")
    if view is not None and getattr(response, "accepted_renderer", None) is None:
        view.finalize_response(request, response)
    response.render()  # type: ignore[attr-defined]


def _stored_response(response: HttpResponseBase) -> StoredResponse | None:
    """What to store for a returned response; ``None`` when it must not be stored."""
    if response.status_code >= 500 and not conf.IDEMPOTENCY_STORE_SERVER_ERRORS:
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


# -- One request's run -----------------------------------------------------------------------


class _Discarded(Exception):
    """Leaves the atomic mode's transaction so that it rolls back."""


class Run:
    """One claim's pass through the protocol, whatever made it: a request or a function call.

    :class:`Execution` (the HTTP adapters' engine) and ``django_idempotency.functions`` (plain
    callables, tasks) both drive a run; every rule about claiming, waiting, replaying, storing,
    releasing, leases and phases lives here, once.

    * :meth:`start` claims the key: ``None`` means run the work (this run owns the key, or the
      store is down and ``IDEMPOTENCY_FAIL_OPEN`` lets the work run unprotected); otherwise it
      returns the completed record to replay. It raises :class:`IdempotencyError` for an
      answer of this layer.
    * :meth:`conclude` stores the outcome (or, with ``None``, releases the key).
    * :meth:`phase` runs one named phase of the work once, across retries, and
      :meth:`foreign_key` derives a key for a call to another service.
    * Leaving the context (or :meth:`abort`) ends the run: the atomic mode's transaction
      commits, or rolls back when the work raised; an unfinished claim is released.
    """

    def __init__(
        self,
        *,
        ttl: timedelta | None = None,
        atomic: bool | None = None,
        wait: timedelta | None = None,
        is_async: bool = False,
    ) -> None:
        self.ttl = conf.IDEMPOTENCY_TTL if ttl is None else ttl
        self.atomic = atomic
        self.wait = wait
        self.is_async = is_async
        self._claim: ClaimRequest | None = None
        self._store: Store | None = None
        self._transaction: ExitStack | None = None
        self._heartbeat: _Heartbeat | None = None
        self._failed = False
        self._done = False
        self._concluded = False
        self._context: Any = None
        self._stored: StoredResponse | None = None
        #: Set when the claim replaced another request's record: "expired" or "abandoned".
        self._taken_over: str | None = None
        #: The phases committed so far, by this run or by the attempts it resumes.
        self._points: tuple[tuple[str, Any], ...] = ()
        self._phases_run: set[str] = set()
        self._resumed_after: str | None = None
        self._foreign_keys: dict[str, str] = {}

    # Context manager: the sync adapters' way in and out.

    def __enter__(self: _Run) -> _Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._failed = True
        self._close(exc)

    @property
    def claimed(self) -> bool:
        """Whether this run owns its key (``False`` without a key, or when failing open)."""
        return self._claim is not None

    @property
    def holds_transaction(self) -> bool:
        """Whether the work runs in the atomic mode's transaction, which it may still undo."""
        return self._transaction is not None

    @property
    def resumed_after(self) -> str | None:
        """The last phase an abandoned earlier attempt at this key committed, or ``None``."""
        return self._resumed_after

    # The protocol.

    def start(self, claim: ClaimRequest, context: Any = None) -> Record | None:
        """Claim ``claim``'s key; ``context`` (the request, or ``None``) goes to the signals."""
        ensure_valid_settings()  # where no `manage.py check` ran: before any store call
        store = get_store()
        atomic = self._atomic_mode(store)
        self._context = context
        key = claim.key
        try:
            record = self._claim_or_find(store, claim, atomic=atomic)
        except StoreUnavailable:
            fail_open = conf.IDEMPOTENCY_FAIL_OPEN
            signals.send("store_unavailable", store, context, claim.scope, key, fail_open=fail_open)
            if not fail_open:
                raise
            # IDEMPOTENCY_FAIL_OPEN: the project chose availability over protection.
            logger.warning(
                "The idempotency store is unavailable: running %s for key %r "
                "unprotected (IDEMPOTENCY_FAIL_OPEN).",
                "the view" if context is not None else "the call",
                key,
                exc_info=True,
            )
            return None
        except IdempotencyKeyInProgress:
            signals.send("key_in_progress", store, context, claim.scope, key)
            raise
        except IdempotencyKeyMismatch:
            signals.send("key_mismatch", store, context, claim.scope, key)
            raise
        if record is not None:
            assert record.response is not None
            status = record.response.status
            signals.send("response_replayed", store, context, claim.scope, key, status=status)
            return record
        if self._taken_over is not None:
            reason = self._taken_over
            signals.send("key_taken_over", store, context, claim.scope, key, reason=reason)
        mode = "lease" if self._transaction is None else "atomic"
        signals.send("key_claimed", store, context, claim.scope, key, mode=mode)
        return None

    def _claim_or_find(self, store: Store, claim: ClaimRequest, *, atomic: bool) -> Record | None:
        wait = conf.IDEMPOTENCY_WAIT if self.wait is None else self.wait
        deadline = time.monotonic() + wait.total_seconds()
        delay = 0.01
        vanished = False
        while True:
            try:
                found = self._claim_once(store, claim, atomic=atomic)
            except KeyLocked as locked:
                if locked.retry_after == 0 and not vanished:
                    # The row went away under us (released or purged): try once more at once.
                    vanished = True
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise IdempotencyKeyInProgress(retry_after=locked.retry_after) from None
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.25)
                continue
            if found is None:
                self._claim, self._store = claim, store
                if not atomic:
                    self._heartbeat = _Heartbeat(store, claim, conf.IDEMPOTENCY_LOCK_TTL)
            return found

    def conclude(self, stored: StoredResponse | None) -> StoreUnavailable | None:
        """Store the work's outcome, or release the key for ``None`` (nothing to store).

        Returns the store's failure when it left nothing behind (the atomic mode rolled the
        work back), for the adapter to report; ``None`` otherwise.
        """
        if self._claim is None or self._done:
            return None
        self._concluded = True
        if self._failed:
            self._close(None)
            return None
        try:
            if stored is None:
                self._failed = True
            else:
                self._complete(stored)
        except StoreUnavailable as exc:
            if self._transaction is None:
                # Lease mode: the work has run and committed; its outcome is the truth. The
                # claim stays in place until its lease passes, holding retries off that long.
                logger.error(
                    "Could not store the response (or result) for key %r.", self._claim.key
                )
                self._close(None)
                return None
            # Atomic mode: roll the work's writes back with the claim; nothing happened.
            self._failed = True
            self._close(exc)
            return exc
        if self._transaction is None:
            self._close(None)
        return None

    def fail(self) -> None:
        self._failed = True

    def abort(self) -> None:
        """Release the claim after the work raised (the async adapters' ``__exit__``)."""
        self._failed = True
        self._close(None)

    # Phases.

    def phase(self, name: str, function: Callable[[], Any], *, atomic: bool = True) -> Any:
        """Run ``function`` once for this key, across retries, and return its result.

        A phase that an earlier, abandoned attempt at this key committed is not run again:
        its stored result is returned. Otherwise ``function`` runs and its result is stored
        as the phase's recovery point; with ``atomic`` (the default) inside one transaction
        with the recovery point, so its database writes and the point commit together. Use
        ``atomic=False`` for a call to another service, with :meth:`foreign_key` as that
        call's own idempotency key: a crash after the call and before its point is saved
        repeats the call, with the same key, and the service answers the first call's result.

        The result must be JSON-serialisable (``DjangoJSONEncoder``); the value returned is
        the JSON round trip, on the first run as on a resumed one, so that the code after a
        phase sees the same value either way. Recovery points need the lease mode
        (``atomic=False`` on the view or function) and a store that keeps them
        (``DatabaseStore``). Sync only: an async view awaits :meth:`aphase`.
        """
        if self._done or self._concluded:
            raise RuntimeError(
                f"The phase {name!r} comes after its request or call has finished (its result "
                "is saved, or it was replayed): there is nothing left to protect it."
            )
        if _in_event_loop():
            raise RuntimeError(
                f"The phase {name!r} was run from async code: use await run.aphase(...)."
            )
        if name in self._phases_run:
            raise ValueError(f"The phase {name!r} has already run in this request.")
        for done, result in self._points:
            if done == name:
                self._phases_run.add(name)
                return result
        store = self._phased_store()
        with ExitStack() as stack:
            if atomic:
                using = None if store is None else store.transaction_alias()
                stack.enter_context(db_transaction.atomic(using=using))
            value = _json_round_trip(function(), what=f"The phase {name!r}")
            if self._claim is not None and store is not None:
                points = (*self._points, (name, value))
                if not store.save_recovery_points(self._claim, points):
                    raise IdempotencyLeaseLost(self._claim.key)
                self._points = points
        self._phases_run.add(name)
        return value

    async def aphase(self, name: str, function: Callable[[], Any], *, atomic: bool = True) -> Any:
        """:meth:`phase` for async views: ``function`` (sync) runs in the request's thread."""
        return await sync_to_async(self.phase)(name, function, atomic=atomic)

    def _phased_store(self) -> PhasedStore | None:
        """The store, for a run that owns its key; ``None`` for an unprotected run."""
        if self._claim is None:
            return None
        store = self._store
        if not getattr(store, "supports_phases", False):
            raise ImproperlyConfigured(
                f"{type(store).__name__} cannot keep recovery points; phases need the "
                "DatabaseStore."
            )
        return cast(PhasedStore, store)

    def foreign_key(self, name: str) -> str:
        """The idempotency key for the call ``name`` to another service, derived from this key.

        The same for every attempt at this key and request (scope, key and fingerprint), so a
        retried call is deduplicated by the other service too; different for every ``name``.
        Without a claimed key (no key sent, or failing open), a random key per run.
        """
        derived = self._foreign_keys.get(name)
        if derived is None:
            claim = self._claim
            if claim is None:
                derived = uuid.uuid4().hex
            else:
                derived = digest([claim.scope, claim.key, claim.fingerprint, name])
            self._foreign_keys[name] = derived
        return derived

    # Internals.

    def _atomic_mode(self, store: Store) -> bool:
        atomic = self.atomic
        if atomic is None:
            return store.supports_atomic and not self.is_async
        if atomic and not store.supports_atomic:
            raise ImproperlyConfigured(
                f"{conf.IDEMPOTENCY_STORE} has no atomic mode; use atomic=False with it."
            )
        return atomic

    def _claim_once(self, store: Store, claim: ClaimRequest, *, atomic: bool) -> Record | None:
        self._taken_over = None
        record = previous = store.get(scope=claim.scope, key=claim.key)
        if record is not None and record.live:
            if record.completed:
                return _completed(record, claim)
            # An atomic-mode claim has no lease: whether its request lives is only known by
            # trying its row lock, below. A lease-mode claim is judged by its lease.
            if record.lease_remaining is not None:
                if record.fingerprint != claim.fingerprint:
                    raise IdempotencyKeyMismatch()
                if record.lease_remaining > 0:
                    raise KeyLocked()
        insert = record is None
        if previous is not None and previous.owner_token != claim.token:
            # What the claim replaces, should it succeed.
            self._taken_over = "abandoned" if previous.live else "expired"
        if not atomic:
            record = store.claim(claim, lease=conf.IDEMPOTENCY_LOCK_TTL, insert=insert)
            return self._decide(record, claim)
        with ExitStack() as transaction:
            try:
                locked = transaction.enter_context(store.lock(claim, insert=insert))
            except KeyLocked:
                if record is not None and record.fingerprint != claim.fingerprint:
                    # A live request holds the key for a different request: that one may
                    # finish, this one never will with this key.
                    raise IdempotencyKeyMismatch() from None
                raise
            found = self._decide(locked, claim)
            if found is None:
                self._transaction = transaction.pop_all()  # open until the work has finished
            return found

    def _decide(self, record: Record, claim: ClaimRequest) -> Record | None:
        """What a record found by a claim means: ``None`` to run the work, else a replay."""
        if record.owner_token == claim.token:
            self._points = record.recovery_points
            self._resumed_after = self._points[-1][0] if self._points else None
            return None
        if record.completed:
            return _completed(record, claim)
        if record.fingerprint != claim.fingerprint:
            raise IdempotencyKeyMismatch()
        # The lease says when a dead request's key may be taken over, not when a live one will
        # finish: suggest an early retry (Retry-After: 1) rather than the lease's remaining
        # time.
        raise KeyLocked()

    def _complete(self, stored: StoredResponse) -> None:
        assert self._claim is not None
        assert self._store is not None
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._store.complete(self._claim, stored):
            self._stored = stored
        else:
            # Only in the lease mode: our lease passed and another request took the key over
            # (the heartbeat failed to renew it). Its record stands; ours is not written.
            logger.warning(
                "Idempotency key %r lost its lease before its response could be stored.",
                self._claim.key,
            )

    def _close(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        if self._heartbeat is not None:
            self._heartbeat.stop()
        atomic = self._transaction is not None
        if self._transaction is not None:
            transaction, self._transaction = self._transaction, None
            if exc is None and self._failed:
                exc = _Discarded()
            if exc is None:
                transaction.close()
            else:
                transaction.__exit__(type(exc), exc, exc.__traceback__)
        stored, self._stored = self._stored, None
        if stored is not None and not self._failed and self._claim is not None:
            # Sent once committed: in the atomic mode, with the work's writes.
            signals.send(
                "response_stored",
                self._store,
                self._context,
                self._claim.scope,
                self._claim.key,
                status=stored.status,
                replayable=stored.body is not None,
            )
        if self._failed and self._claim is not None and self._store is not None:
            if self._points and not atomic:
                # Committed phases are kept for the retry to resume from: the claim stays,
                # and a retry takes it over once its lease has passed.
                self._release_lease()
                return
            try:
                self._store.release(self._claim)
            except (StoreUnavailable, KeyLocked):
                # The claim stays until a retry takes it over (atomic mode: at once, as its
                # lock is free; lease mode: once its lease has passed).
                logger.exception("Could not release idempotency key %r.", self._claim.key)

    def _release_lease(self) -> None:
        """End the lease of a claim with committed phases now, so a retry may resume at once."""
        assert self._claim is not None
        try:
            cast(PhasedStore, self._store).end_lease(self._claim)
        except (StoreUnavailable, KeyLocked):
            logger.exception("Could not end the lease of idempotency key %r.", self._claim.key)


class Execution(Run):
    """One request's pass through the protocol, shared by every HTTP adapter.

    Sync adapters use it as a context manager around the view (and, for DRF, around
    ``dispatch``); the atomic mode's transaction lives inside it. Async adapters call
    :meth:`begin`, :meth:`finish` and :meth:`abort` through ``sync_to_async``.

    * :meth:`begin` returns ``None`` to run the view, or the response to send instead (a
      replay); it raises :class:`IdempotencyError` for an answer of this layer.
    * :meth:`finish` stores what the view returned (or rolls back / releases) and returns the
      response to send.
    * :meth:`fail` marks the view as having raised, where a framework turned the exception
      into a response (DRF's ``handle_exception``): nothing is stored and the key is released.

    The view finds the execution as ``request.idempotency``, for :meth:`Run.phase` and
    :meth:`Run.foreign_key`.
    """

    def __init__(self, options: Options | None = None, *, is_async: bool = False) -> None:
        self.options = options = options or Options()
        super().__init__(
            ttl=options.ttl, atomic=options.atomic, wait=options.wait, is_async=is_async
        )

    def begin(self, request: Any) -> HttpResponse | None:
        ensure_valid_settings()  # first: IDEMPOTENCY_METHODS decides what is covered
        options = self.options
        http_request = getattr(request, "_request", request)  # a DRF Request wraps Django's
        http_request.idempotency = self  # for phases and foreign keys, also without a key
        if request.method not in options.covered_methods:
            return None
        raw_key = request.headers.get(conf.IDEMPOTENCY_HEADER)
        if raw_key is None:
            required = conf.IDEMPOTENCY_REQUIRED if options.required is None else options.required
            if required:
                raise IdempotencyKeyMissing()
            return None
        key = parse_key(raw_key)
        if not storable(http_request.path):
            raise RequestInvalid(RequestInvalid.unstorable_path_detail)
        fingerprint = _fingerprint(http_request)
        _check_body_complete(http_request)
        claim = ClaimRequest(
            scope=_scope(request),
            key=key,
            fingerprint=fingerprint,
            method=http_request.method,
            path=http_request.path[:2048],
            token=uuid.uuid4().hex,
            ttl=self.ttl,
        )
        record = self.start(claim, request)
        if record is None:
            return None
        assert record.response is not None
        return replay_response(record.response)

    def finish(self, request: Any, response: HttpResponseBase) -> HttpResponseBase:
        if self._claim is None or self._done:
            return response
        if not self._failed:
            _render(request, response)
        error = self.conclude(None if self._failed else _stored_response(response))
        return response if error is None else error_response(error)


def _scope(request: Any) -> str:
    return _fit(get_scope_function()(request), MAX_KEY_LENGTH)


def _fingerprint(request: HttpRequest) -> str:
    return _fit(get_fingerprint_function()(request), 64)


def _fit(value: str, length: int) -> str:
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


def _check_body_complete(request: HttpRequest) -> None:
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
            raise RequestInvalid() from exc
    if received < expected:
        raise RequestInvalid(RequestInvalid.truncated_detail)


def _completed(record: Record, claim: ClaimRequest) -> Record:
    """A completed record found for ``claim``, checked: the same request, with its outcome kept."""
    if record.fingerprint != claim.fingerprint:
        raise IdempotencyKeyMismatch()
    assert record.response is not None
    if record.response.body is None:
        raise IdempotencyResponseNotStored(original_status=record.response.status)
    return record


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _json_round_trip(value: Any, *, what: str) -> Any:
    """``value`` as JSON gives it back; a ``TypeError`` that says what to change otherwise."""
    try:
        text = json.dumps(value, cls=DjangoJSONEncoder)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} returned a value that JSON cannot store: {exc}") from exc
    return json.loads(text)


class _Heartbeat:
    """Keeps a lease-mode claim alive while its view runs, so no retry can take it over.

    Most views finish long before their first renewal is due (a third of the lease), so a
    heartbeat's own thread is only started then, by the process's :class:`_Scheduler`; until
    then it costs an entry in the scheduler's queue rather than a thread per request. Each
    renewing heartbeat keeps its own thread (and database connection), so a renewal stuck on
    the database delays no other request's.
    """

    def __init__(self, store: Store, claim: ClaimRequest, lease: timedelta) -> None:
        self._store, self._claim, self._lease = store, claim, lease
        self._interval = max(lease.total_seconds() / 3, 0.05)
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        _scheduler().add(time.monotonic() + self._interval, self)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def start(self) -> None:
        """Start renewing now (the first renewal is due), unless the view has finished."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name="idempotency-heartbeat", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    if not self._store.renew(self._claim, lease=self._lease):
                        return
                except Exception:  # keep beating: the next renewal may well succeed
                    logger.warning("Could not renew the lease of key %r.", self._claim.key)
                if self._stopped.wait(self._interval):
                    return
        finally:
            connections.close_all()  # this thread's own connections only

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            thread = self._thread
        if thread is None:
            _scheduler().forget()
        else:
            # Don't wait long: a renewal in flight can be stuck behind our own transaction (an
            # uncommitted claim under ATOMIC_REQUESTS on MariaDB), which only ends after we
            # return. Renewals are fenced on the unfinished state, so a late one changes
            # nothing.
            thread.join(timeout=0.5)


class _Scheduler:
    """One thread per process that starts each heartbeat when its first renewal is due."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._queue: list[tuple[float, int, _Heartbeat]] = []
        self._order = itertools.count()  # ties in time never compare heartbeats
        self._thread: threading.Thread | None = None
        self._stopped = 0  # heartbeats in the queue that stopped before they started

    def add(self, due: float, heartbeat: _Heartbeat) -> None:
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="idempotency-heartbeat-scheduler", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._queue, (due, next(self._order), heartbeat))
            if self._queue[0][2] is heartbeat:  # the thread sleeps until a later time
                self._condition.notify()

    def forget(self) -> None:
        """Note that a queued heartbeat has stopped; drop such entries once they are most.

        Otherwise a long lease (a long wait until the first renewal) under a high request
        rate would keep every finished request's heartbeat queued until that time.
        """
        with self._condition:
            self._stopped += 1
            if self._stopped > 1000 and self._stopped * 2 > len(self._queue):
                self._queue = [entry for entry in self._queue if not entry[2].stopped]
                heapq.heapify(self._queue)
                self._stopped = 0

    def _serve(self) -> None:
        while True:
            with self._condition:
                while True:
                    now = time.monotonic()
                    if self._queue and self._queue[0][0] <= now:
                        heartbeat = heapq.heappop(self._queue)[2]
                        if heartbeat.stopped:
                            self._stopped = max(self._stopped - 1, 0)
                        break
                    self._condition.wait(self._queue[0][0] - now if self._queue else None)
            try:
                heartbeat.start()  # does nothing for a heartbeat already stopped
            except Exception:  # pragma: no cover - out of threads: keep serving the others
                logger.exception("Could not start a lease heartbeat.")


_schedulers: dict[int, _Scheduler] = {}
_schedulers_lock = threading.Lock()


def _scheduler() -> _Scheduler:
    """This process's scheduler; a forked child (gunicorn's workers) gets its own."""
    pid = os.getpid()
    with _schedulers_lock:
        scheduler = _schedulers.get(pid)
        if scheduler is None:
            _schedulers.clear()  # the parent's, whose thread did not survive the fork
            scheduler = _schedulers[pid] = _Scheduler()
        return scheduler
