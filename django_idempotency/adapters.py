"""The adapters' toolkit: what the decorator, the middleware, the DRF mixin, functions and Celery
tasks share, so that none of them re-implements a step of the protocol.

* :class:`Options`, each adapter's per-view (or per-function) options, validated when it wraps;
* :class:`Execution`, one HTTP request's :class:`~django_idempotency.lifecycle.Run`, with the
  same verbs (``begin``, ``finish``, ``abort``) taking Django's request and response;
* :func:`run_async`, the async pass around ``begin``/``finish``/``abort``;
* :func:`refuse_async_atomic`, the one check that an async callable is not set to the atomic
  mode.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpResponse
from django.http.response import HttpResponseBase

from django_idempotency.checks import ensure_valid_settings
from django_idempotency.conf import (
    SAFE_METHODS,
    InvalidValue,
    conf,
    describe,
    validate_bool,
    validate_duration,
    validate_methods,
    validate_statuses,
)
from django_idempotency.exceptions import IdempotencyError
from django_idempotency.http import (
    add_expiry,
    error_response,
    read_claim,
    render,
    replay_response,
    stored_response,
)
from django_idempotency.lifecycle import Run, State

_Result = TypeVar("_Result")
_Answer = TypeVar("_Answer")

# -- Options ----------------------------------------------------------------------------------


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
    "stored_statuses": lambda value, name: validate_statuses(value),
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
    there, never an error at request time. ``methods`` is kept as a frozenset, upper-cased;
    ``stored_statuses`` as a frozenset, its classes lower-cased.
    """

    required: bool | None = None
    ttl: timedelta | None = None
    methods: Iterable[str] | None = None
    atomic: bool | None = None
    wait: timedelta | None = None
    #: Which returned statuses are stored (``"2xx"``, ``409``...); kept as a frozenset.
    stored_statuses: Iterable[str | int] | None = None
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

    @property
    def key_required(self) -> bool:
        return conf.IDEMPOTENCY_REQUIRED if self.required is None else self.required

    @property
    def statuses(self) -> frozenset[str | int] | None:
        """``stored_statuses`` as validated (``None``: follow the settings)."""
        return None if self.stored_statuses is None else frozenset(self.stored_statuses)


def refuse_async_atomic(atomic: object, what: str) -> None:
    """Refuse ``atomic=True`` on an async view, function or call; ``what`` says which, as in
    "@idempotent(atomic=True) cannot wrap the async view shop.views.pay"."""
    if atomic:
        raise ImproperlyConfigured(
            f"{what}: Django cannot hold a transaction open across an await. Leave atomic unset."
        )


# -- HTTP requests ----------------------------------------------------------------------------


class Execution:
    """One request's :class:`Run`, in Django's terms; shared by every HTTP adapter.

    Sync adapters use it as a context manager around the view (and, for DRF, around
    ``dispatch``); the atomic mode's transaction lives inside it. Async adapters go through
    :func:`run_async`.

    * :meth:`begin` returns ``None`` to run the view, or the response to send instead: a
      replay, or the problem response for an error of this layer.
    * :meth:`finish` stores what the view returned (or rolls back / releases) and returns the
      response to send.
    * :meth:`fail` marks the view as having raised, where a framework turned the exception
      into a response (DRF's ``handle_exception``): nothing is stored and the key is released
      when the block ends; :meth:`abort` does so at once.

    The view finds the run as ``request.idempotency``, for :meth:`Run.phase` and
    :meth:`Run.foreign_key`.
    """

    def __init__(self, options: Options | None = None, *, is_async: bool = False) -> None:
        self.options = options = options or Options()
        self.run = Run(ttl=options.ttl, atomic=options.atomic, wait=options.wait, is_async=is_async)

    def __enter__(self) -> Execution:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.run.__exit__(*exc_info)

    def begin(self, request: Any) -> HttpResponse | None:
        ensure_valid_settings()  # first: IDEMPOTENCY_METHODS decides what is covered
        http_request = getattr(request, "_request", request)  # a DRF Request wraps Django's
        http_request.idempotency = self.run  # for phases and foreign keys, also without a key
        options = self.options
        try:
            claim = read_claim(
                request,
                methods=options.covered_methods,
                required=options.key_required,
                ttl=self.run.ttl,
            )
            record = None if claim is None else self.run.begin(claim, request)
        except IdempotencyError as exc:
            return error_response(exc)
        if record is None:
            return None
        assert record.response is not None
        return replay_response(record.response, record.expires_in)

    def finish(self, request: Any, response: HttpResponseBase) -> HttpResponseBase:
        state = self.run.state
        if state is State.FAILED:
            self.run.finish(None)  # ends the run: the key is freed
        elif state is State.CLAIMED:
            render(request, response)
            # The response is the last thing the run stores: the atomic mode's transaction
            # may commit with it.
            error = self.run.finish(stored_response(response, self.options.statuses), ending=True)
            if error is not None:
                return error_response(error)
            if self.run.replayable:
                # Written as the store's clock + TTL; this is the app's (they may differ by
                # the clock skew between the two).
                add_expiry(response, self.run.ttl.total_seconds())
        return response

    def fail(self) -> None:
        self.run.fail()

    def abort(self) -> None:
        self.run.abort()


async def run_async(
    work: Callable[[], Awaitable[_Result]],
    *,
    finish: Callable[[_Result], _Answer],
    abort: Callable[[], object],
    begin: Callable[[], _Answer | None] | None = None,
) -> _Answer:
    """The async adapters' pass: ``begin()`` (where the adapter begins here) may answer
    instead of the work; then ``work()`` is awaited, and ``finish(result)`` answers, or
    ``abort()`` runs when it raised. Each step runs through ``sync_to_async`` (thread-
    sensitive: the ORM's transactions are synchronous, and one thread keeps one connection).
    """
    if begin is not None:
        answer = await sync_to_async(begin)()
        if answer is not None:
            return answer
    try:
        result = await work()
    except BaseException:
        await sync_to_async(abort)()
        raise
    return await sync_to_async(finish)(result)
