"""Idempotent functions: run a callable once per key, and return its stored result after that.

Work is retried outside views too: a message consumer gets a message at least once, an agent
re-sends a tool call after a timeout, a command is re-run after a crash. The same core and
store as the views' protect it, with the same modes, errors, TTL and purge:

* :func:`idempotent_function`, a decorator, keyed by the caller (``idempotency_key=``) or by
  a function of the arguments (``key=``);
* :func:`idempotent_call`, a context manager for a block of code.

A result is stored through a serializer (:class:`JSONSerializer` unless
``IDEMPOTENCY_SERIALIZER`` or ``serializer=`` says otherwise); a later call with the key gets
the stored result as the serializer gives it back. Errors are raised as exceptions: the key
used with other arguments (:class:`IdempotencyKeyMismatch`), a call with the key still running
(:class:`IdempotencyKeyInProgress`, after ``wait``), a result that was too large to store
(:class:`IdempotencyResponseNotStored`) and an unreachable store
(:class:`IdempotencyStoreUnavailable`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import wraps
from typing import Any, Protocol, TypeVar, overload

from asgiref.sync import iscoroutinefunction
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils.module_loading import import_string

from django_idempotency.adapters import Options, option_error, refuse_async_atomic, run_async
from django_idempotency.conf import InvalidValue, conf, describe, validate_bool
from django_idempotency.exceptions import (
    IdempotencyError,
    IdempotencyKeyInProgress,
    IdempotencyKeyMismatch,
    IdempotencyKeyMissing,
    IdempotencyResponseNotStored,
)
from django_idempotency.http import MAX_KEY_LENGTH, fit
from django_idempotency.lifecycle import Run
from django_idempotency.records import ClaimRequest, StoredResponse, digest

__all__ = [
    "IdempotentCall",
    "JSONSerializer",
    "Serializer",
    "idempotent_call",
    "idempotent_function",
]

Func = TypeVar("Func", bound=Callable[..., Any])

#: The method column of a call's record (a request's is its HTTP method).
CALL_METHOD = "CALL"


class Serializer(Protocol):
    """How results are stored: bytes out, the value back in."""

    #: Stored with the result, as its ``Content-Type``, and shown by the admin.
    content_type: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JSONSerializer:
    """The default: JSON, with Django's encoder (dates, decimals and UUIDs become strings).

    A result comes back as JSON gives it: a tuple as a list, a ``Decimal`` as a string.
    """

    content_type = "application/json"

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, cls=DjangoJSONEncoder, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


def get_serializer(serializer: Serializer | str | None) -> Serializer:
    """``serializer`` itself, or the class its dotted path names, instantiated."""
    if serializer is None:
        serializer = conf.IDEMPOTENCY_SERIALIZER
    if isinstance(serializer, str):
        serializer_class = import_string(serializer)
        return serializer_class()  # type: ignore[no-any-return]
    return serializer


class IdempotentCall:
    """One call's pass through the protocol; what :func:`idempotent_call` returns.

    Inside the ``with`` block, :attr:`replayed` says whether the key was used before: then
    :attr:`result` is the stored result and the work must not run. Otherwise do the work and
    hand its result to :meth:`save`; a block that ends without saving stores ``None``. A
    block that raises stores nothing and frees the key (in the atomic mode, its database
    writes are rolled back), so a retry runs it again, unless it committed phases: then a
    retry resumes after the last of them.
    """

    def __init__(
        self,
        key: Any,
        *,
        scope: str,
        fingerprint: Any = None,
        ttl: timedelta | None = None,
        atomic: bool | None = None,
        wait: timedelta | None = None,
        serializer: Serializer | str | None = None,
        name: str | None = None,
        is_async: bool = False,
    ) -> None:
        if not isinstance(scope, str) or not scope:
            raise TypeError(
                f"The scope of an idempotent call must be a non-empty string, not {scope!r}."
            )
        self.key = _call_key(key)
        self.scope = fit(scope, MAX_KEY_LENGTH)
        self.name = name or self.scope
        self.fingerprint = _digest(fingerprint, what="the fingerprint")
        self.serializer = get_serializer(serializer)
        options = Options(
            ttl=ttl, atomic=atomic, wait=wait, owner=f"The idempotent call {self.name!r}"
        )
        if is_async:
            refuse_async_atomic(
                atomic, f"The async idempotent call {self.name!r} cannot use atomic=True"
            )
        self._run = Run(
            ttl=options.ttl, atomic=options.atomic, wait=options.wait, is_async=is_async
        )
        #: Whether the key was used before, and :attr:`result` is that call's stored result.
        self.replayed = False
        self.result: Any = None
        self._saved = False

    def __enter__(self) -> IdempotentCall:
        self.begin()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    def begin(self) -> None:
        """Claim the key, or find its stored result (:attr:`replayed`): entering the block."""
        claim = ClaimRequest(
            scope=self.scope,
            key=self.key,
            fingerprint=self.fingerprint,
            method=CALL_METHOD,
            path=self.name[:2048],
            token=uuid.uuid4().hex,
            ttl=self._run.ttl,
        )
        try:
            record = self._run.begin(claim)
        except IdempotencyError as exc:
            self._run.abort()
            raise _for_calls(exc, self.name) from None
        except BaseException:
            self._run.abort()
            raise
        if record is not None:
            assert record.response is not None
            assert record.response.body is not None
            self.replayed = True
            self.result = self.serializer.loads(record.response.body)

    def finish(self, result: Any = None) -> Any:
        """End the call (leaving the block): ``result`` is saved first, unless the call was
        replayed or saved already. Returns ``result`` as given."""
        if not self.replayed and not self._saved:
            try:
                self._save(result, ending=True)
            except BaseException:
                self._run.abort()
                raise
        self._run.end()
        return result

    def abort(self) -> None:
        """End the call after its work raised: nothing is stored, and the key is freed (or,
        with committed phases, kept for a retry to resume)."""
        self._run.abort()

    @property
    def claimed(self) -> bool:
        """Whether this call owns the key (``False`` when replayed, or when failing open)."""
        return self._run.claimed

    def save(self, result: Any) -> Any:
        """Store ``result`` for every later call with this key; return it as they will get it.

        That is, as the serializer gives it back (JSON: a tuple becomes a list, a ``Decimal``
        a string), on the first call as on every replay.
        """
        return self._save(result, ending=False)

    def _save(self, result: Any, *, ending: bool) -> Any:
        """:meth:`save`; ``ending``: the block ends right after (so the atomic mode's
        transaction may commit with the result)."""
        if self.replayed:
            raise RuntimeError("This call was replayed: there is nothing to save.")
        if self._saved:
            raise RuntimeError("This call's result has been saved already.")
        headers = [("Content-Type", self.serializer.content_type)]
        try:
            data = self.serializer.dumps(result)
        except Exception as exc:
            if not self._run.holds_transaction:
                # The lease mode: the work has run and its effects stay. Record it as done,
                # without a result, so that no retry runs it again (they get
                # IdempotencyResponseNotStored). The atomic mode rolls it all back instead.
                self._run.finish(StoredResponse(status=200, headers=headers, body=None))
                self._saved = True
            raise TypeError(
                f"{self.name} returned a result that {type(self.serializer).__name__} cannot "
                f"store: {exc}. Return plain data, or pass serializer=."
            ) from exc
        # Too large: later calls get IdempotencyResponseNotStored; the call is done all the same.
        body = data if len(data) <= conf.IDEMPOTENCY_MAX_RESPONSE_SIZE else None
        error = self._run.finish(
            StoredResponse(status=200, headers=headers, body=body), ending=ending
        )
        if error is not None:
            raise error  # the atomic mode rolled the work back: nothing happened
        self._saved = True
        # What every later call gets, so that the code after the call sees the same value on
        # the first run as on a replay.
        return result if body is None else self.serializer.loads(body)

    def run(self, work: Callable[[], Any]) -> Any:
        """The whole call: enter, then the stored result, or ``work()``'s result saved; leave."""
        with self:
            return self.result if self.replayed else self.save(work())

    def phase(
        self,
        name: str,
        function: Callable[[], Any],
        *,
        atomic: bool = True,
        compensate: str | None = None,
    ) -> Any:
        """Run one named phase of the work once for this key; see :meth:`lifecycle.Run.phase`."""
        if self.replayed:
            raise RuntimeError(f"This call was replayed: its phase {name!r} must not run.")
        return self._run.phase(name, function, atomic=atomic, compensate=compensate)

    def compensate(self) -> list[str]:
        """Undo the committed phases; see :meth:`lifecycle.Run.compensate`. A block that
        raises after it finishes its key without a result: later calls get
        :class:`IdempotencyResponseNotStored`."""
        if self.replayed:
            raise RuntimeError("This call was replayed: there is nothing to compensate.")
        return self._run.compensate()

    def foreign_key(self, name: str) -> str:
        """The key for the call ``name`` to another service; see ``lifecycle.Run.foreign_key``."""
        return self._run.foreign_key(name)

    @property
    def resumed_after(self) -> str | None:
        """The last phase an abandoned earlier attempt at this key committed, or ``None``."""
        return self._run.resumed_after


def idempotent_call(
    key: Any,
    *,
    scope: str,
    fingerprint: Any = None,
    ttl: timedelta | None = None,
    atomic: bool | None = None,
    wait: timedelta | None = None,
    serializer: Serializer | str | None = None,
) -> IdempotentCall:
    """Run a block of code once per ``(scope, key)``::

        with idempotent_call(f"invoice-{invoice.pk}", scope="billing.send_invoice") as call:
            if call.replayed:
                return call.result
            receipt = mailer.send(invoice)
            call.save({"message_id": receipt.id})

    ``scope`` names the operation (keys of different scopes never meet); ``fingerprint`` is
    any JSON-serialisable description of the call's inputs, so that the key reused with other
    inputs raises :class:`IdempotencyKeyMismatch`. ``ttl``, ``atomic`` and ``wait`` are the
    views' options: by default the block runs inside the transaction that locks the key and
    stores the result (inside the caller's transaction, if there is one), or with
    ``atomic=False`` in the lease mode.
    """
    return IdempotentCall(
        key,
        scope=scope,
        fingerprint=fingerprint,
        ttl=ttl,
        atomic=atomic,
        wait=wait,
        serializer=serializer,
    )


@overload
def idempotent_function(func: Func, /) -> Func: ...


@overload
def idempotent_function(
    *,
    key: Callable[..., Any] | None = None,
    scope: str | Callable[..., str] | None = None,
    fingerprint: Callable[..., Any] | None = None,
    ttl: timedelta | None = None,
    atomic: bool | None = None,
    wait: timedelta | None = None,
    serializer: Serializer | str | None = None,
    required: bool = True,
) -> Callable[[Func], Func]: ...


def idempotent_function(
    func: Callable[..., Any] | None = None,
    /,
    *,
    key: Callable[..., Any] | None = None,
    scope: str | Callable[..., str] | None = None,
    fingerprint: Callable[..., Any] | None = None,
    ttl: timedelta | None = None,
    atomic: bool | None = None,
    wait: timedelta | None = None,
    serializer: Serializer | str | None = None,
    required: bool = True,
) -> Any:
    """Run a function once per key and return its stored result to every later call.

    The key is the caller's ``idempotency_key=`` keyword (taken out before the function is
    called), or else ``key(*args, **kwargs)``::

        @idempotent_function(key=lambda order_id, amount: f"refund-{order_id}")
        def refund(order_id, amount): ...

        @idempotent_function
        def send_receipt(order_id): ...

        send_receipt(42, idempotency_key=message_id)

    * ``scope``: a string, or a function of the arguments; by default the function's dotted
      name, so two functions never share keys;
    * ``fingerprint``: a function of the arguments whose JSON-serialisable result describes
      the call; by default the arguments themselves (a model instance counts as its label and
      primary key). The key reused with a different fingerprint raises
      :class:`IdempotencyKeyMismatch`;
    * ``required``: with ``False``, a call without a key runs unprotected;
    * ``ttl``, ``atomic``, ``wait`` and ``serializer`` as for :func:`idempotent_call`.

    Async functions are supported, in the lease mode.
    """

    if func is not None and not callable(func):
        raise TypeError(
            f"@idempotent_function takes a function, or options by keyword, not {func!r}."
        )

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        name = f"{func.__module__}.{func.__qualname__}"
        options = CallOptions(
            f"@idempotent_function on {name}",
            key=key,
            scope=scope,
            fingerprint=fingerprint,
            ttl=ttl,
            atomic=atomic,
            wait=wait,
            serializer=serializer,
            flags={"required": required},
        )
        if iscoroutinefunction(func):
            refuse_async_atomic(
                atomic, f"@idempotent_function(atomic=True) cannot wrap the async function {name}"
            )

        def prepare(
            args: tuple[Any, ...], kwargs: dict[str, Any], is_async: bool
        ) -> IdempotentCall | None:
            call_key = kwargs.pop("idempotency_key", None)
            if call_key is None and key is not None:
                call_key = key(*args, **kwargs)
            if (call_key is None or call_key == "") and not required:
                return None
            return options.call(
                call_key,
                args=args,
                kwargs=kwargs,
                name=name,
                default_scope=f"function:{name}",
                missing=f"{name} is idempotent and needs a key: pass idempotency_key=..., or "
                "give the decorator key=.",
                is_async=is_async,
            )

        if iscoroutinefunction(func):

            @wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                call = prepare(args, kwargs, True)
                if call is None:
                    return await func(*args, **kwargs)

                async def work() -> Any:
                    return call.result if call.replayed else await func(*args, **kwargs)

                return await run_async(work, begin=call.begin, finish=call.finish, abort=call.abort)

            async_wrapper.idempotent_function = name  # type: ignore[attr-defined]
            return async_wrapper

        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            call = prepare(args, kwargs, False)
            if call is None:
                return func(*args, **kwargs)
            return call.run(lambda: func(*args, **kwargs))

        wrapper.idempotent_function = name  # type: ignore[attr-defined]
        return wrapper

    if func is not None:
        return decorator(func)
    return decorator


# -- Keys, fingerprints and errors ------------------------------------------------------------


@dataclass(frozen=True)
class CallOptions:
    """A decorator's options for the calls it makes (a function's, a task's), validated when
    it wraps its function, with the settings' validators: ``ImproperlyConfigured`` naming
    ``owner`` and the option, never an error at call time. ``flags`` are the decorator's own
    True/False options, only validated here."""

    owner: str
    key: Callable[..., Any] | None = None
    scope: str | Callable[..., str] | None = None
    fingerprint: Callable[..., Any] | None = None
    ttl: timedelta | None = None
    atomic: bool | None = None
    wait: timedelta | None = None
    serializer: Serializer | str | None = None
    flags: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = self.owner
        Options(ttl=self.ttl, atomic=self.atomic, wait=self.wait, owner=owner)
        for name, value in self.flags.items():
            try:
                validate_bool(value)
            except InvalidValue as exc:
                raise option_error(owner, name, exc) from None
        for name, value in (("key", self.key), ("fingerprint", self.fingerprint)):
            if value is not None and not callable(value):
                raise option_error(
                    owner,
                    name,
                    InvalidValue(f"must be a function of the arguments, not {describe(value)}."),
                )
        scope = self.scope
        if not (scope is None or callable(scope) or (isinstance(scope, str) and scope)):
            raise option_error(
                owner,
                "scope",
                InvalidValue(
                    "must be a non-empty string or a function of the arguments, not "
                    f"{describe(scope)}."
                ),
            )
        serializer = self.serializer
        if not (
            serializer is None
            or (isinstance(serializer, str) and serializer)
            or all(callable(getattr(serializer, name, None)) for name in ("dumps", "loads"))
        ):
            raise option_error(
                owner,
                "serializer",
                InvalidValue(
                    f"must be a serializer (with dumps() and loads()) or its dotted path, not "
                    f"{describe(serializer)}."
                ),
            )

    def call(
        self,
        key: Any,
        *,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str,
        default_scope: str,
        missing: str,
        is_async: bool = False,
    ) -> IdempotentCall:
        """The call of ``name`` with these arguments and ``key``; ``missing`` is the
        :class:`IdempotencyKeyMissing` message for an empty key. The scope is the option
        (a string, or a function of the arguments), else ``default_scope``."""
        if key is None or key == "":
            raise IdempotencyKeyMissing(missing)
        scope = self.scope
        if scope is None:
            scope = default_scope
        elif callable(scope):
            scope = scope(*args, **kwargs)
        return IdempotentCall(
            key,
            scope=scope,
            fingerprint=describe_arguments(self.fingerprint, args, kwargs),
            ttl=self.ttl,
            atomic=self.atomic,
            wait=self.wait,
            serializer=self.serializer,
            name=name,
            is_async=is_async,
        )


def describe_arguments(
    fingerprint: Callable[..., Any] | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """What a call's fingerprint is computed from: ``fingerprint(*args, **kwargs)``, by default
    the arguments themselves."""
    return [list(args), kwargs] if fingerprint is None else fingerprint(*args, **kwargs)


def _call_key(key: Any) -> str:
    """A call's key as stored: text, and a digest when longer than the column."""
    if isinstance(key, bytes) or key is None:
        raise TypeError(f"An idempotency key must be a string (or an int or UUID), not {key!r}.")
    text = str(key)
    if not text:
        raise IdempotencyKeyMissing("An idempotency key must not be empty.")
    return fit(text, MAX_KEY_LENGTH)


class _ArgumentEncoder(DjangoJSONEncoder):
    """JSON for fingerprints: a model instance is its model's label and its primary key."""

    def default(self, o: Any) -> Any:
        if isinstance(o, models.Model):
            return ["model", o._meta.label_lower, o.pk]
        if isinstance(o, (set, frozenset)):
            return sorted(self.encode(item) for item in o)
        return super().default(o)


def _digest(value: Any, *, what: str) -> str:
    """The SHA-256 of ``value``'s canonical JSON; a ``TypeError`` saying what to change."""
    try:
        text = json.dumps(value, cls=_ArgumentEncoder, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"Cannot compute {what} of an idempotent call: {exc}. Pass fingerprint= (a function "
            "of the arguments returning JSON-serialisable data that describes the call)."
        ) from exc
    return digest(text)


def _for_calls(exc: IdempotencyError, name: str) -> IdempotencyError:
    """``exc`` with a message about a call rather than about an HTTP request."""
    if isinstance(exc, IdempotencyKeyMismatch):
        return IdempotencyKeyMismatch(
            f"This idempotency key was already used for a call of {name} with different "
            "arguments. Use a new key for a new call."
        )
    if isinstance(exc, IdempotencyKeyInProgress):
        return IdempotencyKeyInProgress(
            f"A call of {name} with this idempotency key is still running. Retry after "
            f"{exc.headers.get('Retry-After', '1')} s to receive its result.",
            retry_after=exc.retry_after,
        )
    if isinstance(exc, IdempotencyResponseNotStored):
        return IdempotencyResponseNotStored(
            f"A call of {name} with this idempotency key already ran, but its result was not "
            "stored (too large, or closed by an operator after it was abandoned). It will "
            "not run again with this key.",
            original_status=exc.original_status,
        )
    return exc
