"""Phases and recovery points: run each named phase of a run's work once, across retries.

A run's :class:`Phases` keeps the phases committed so far (by this attempt, or by the
abandoned attempts it resumes) and derives keys for calls to other services; the run decides
when phases are allowed and hands in its claim and store (see docs/phases.md).

A phase may name a *compensation* (:func:`compensation` registers one): the code that undoes
it. :meth:`Phases.compensate` runs the compensations of the committed phases, in reverse
order, each once, recording each on the key's recovery points; :func:`compensate_abandoned`
does it for requests abandoned mid-way (``manage.py idempotency_abandoned --compensate``).
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils.module_loading import autodiscover_modules

from django_idempotency.conf import conf, describe, get_store
from django_idempotency.exceptions import IdempotencyLeaseLost, IdempotencyStoreUnavailable
from django_idempotency.heartbeat import Heartbeat
from django_idempotency.models import IdempotencyKey
from django_idempotency.records import ClaimRequest, StoredResponse, digest
from django_idempotency.stores import KeyLocked, PhasedStore, Store

__all__ = ["Compensation", "compensate_abandoned", "compensation", "compensation_key"]

#: A recovery point: ``(name, result)``, or ``(name, result, compensation)`` for a phase that
#: declared a compensation, where ``compensation`` is ``{"compensation": <registered name>}``,
#: with ``"compensated": True`` added once it has run. Points stored before compensations
#: existed are pairs, and stay valid.
Point = tuple[Any, ...]
#: A run's recovery points: each committed phase, in order.
Points = tuple[Point, ...]

_Function = TypeVar("_Function", bound=Callable[..., Any])

#: The registered compensations, by name.
_COMPENSATIONS: dict[str, Callable[..., Any]] = {}


def compensation(name: str) -> Callable[[_Function], _Function]:
    """Register the decorated function as the compensation ``name``.

    A phase names it (``run.phase("payment", charge, compensate="refund-charge")``); it is
    called as ``function(result, *, key=...)`` with the phase's stored (JSON) result and a key
    derived from the request's key for this compensation alone (:func:`compensation_key`), to
    pass to the other service's call. It may run in another process than the phase (the
    ``idempotency_abandoned --compensate`` command), so it is found by name: define it at
    module level, in a module imported at startup, or in ``<app>/compensations.py`` of an
    installed app, which is imported when a name is not found otherwise.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"A compensation's name must be a non-empty string, not {name!r}.")

    def register(function: _Function) -> _Function:
        known = _COMPENSATIONS.get(name)
        if known is not None and _qualified(known) != _qualified(function):
            raise ValueError(
                f"The compensation {name!r} is registered already, by {_qualified(known)}."
            )
        _COMPENSATIONS[name] = function
        return function

    return register


def get_compensation(name: str) -> Callable[..., Any]:
    """The compensation registered as ``name``; ``LookupError`` saying how to register it."""
    function = _COMPENSATIONS.get(name)
    if function is None:
        autodiscover_modules("compensations")  # each app's compensations.py, once imported
        function = _COMPENSATIONS.get(name)
    if function is None:
        raise LookupError(
            f"No compensation is registered as {name!r}: decorate its function with "
            f"@compensation({name!r}) in a module imported at startup, or in an installed "
            "app's compensations.py."
        )
    return function


def compensation_key(claim: ClaimRequest | None, name: str) -> str:
    """The key of the compensation of the phase ``name``: stable per request, never a
    :meth:`Phases.foreign_key` (random without a claimed key)."""
    if claim is None:
        return uuid.uuid4().hex
    # Five items: never the digest of a foreign key's four, whatever the names.
    return digest([claim.scope, claim.key, claim.fingerprint, name, "compensate"])


class Phases:
    """The phases of one run: what is committed, what ran in this attempt, foreign keys."""

    def __init__(self) -> None:
        #: The phases committed so far, by this run or by the attempts it resumes (without a
        #: claimed key: the phases this attempt ran).
        self.points: Points = ()
        #: The last phase an abandoned earlier attempt committed, or ``None``.
        self.resumed_after: str | None = None
        #: Whether :meth:`compensate` has run every compensation.
        self.compensated = False
        #: The compensations :meth:`compensate` ran, in order.
        self.compensations_run: list[str] = []
        self._ran: set[str] = set()
        self._foreign_keys: dict[str, str] = {}

    def resume(self, points: Points) -> None:
        """Start from the recovery points of the record this run claimed."""
        self.points = points
        self.resumed_after = points[-1][0] if points else None

    def run(
        self,
        name: str,
        function: Callable[[], Any],
        *,
        atomic: bool,
        compensate: str | None = None,
        claim: ClaimRequest | None,
        store: Store | None,
    ) -> Any:
        """Run the phase ``name`` once for ``claim`` (``None``: unprotected); see ``Run.phase``."""
        if _in_event_loop():
            raise RuntimeError(
                f"The phase {name!r} was run from async code: use await run.aphase(...)."
            )
        if compensate is not None:
            if not isinstance(compensate, str) or not compensate:
                raise TypeError(
                    f"The phase {name!r}: compensate must be the name of a registered "
                    f"compensation (a non-empty string), not {describe(compensate)}."
                )
            get_compensation(compensate)  # a typo fails here, before the phase runs
        if self.compensated:
            raise RuntimeError(
                f"The phase {name!r} comes after compensate(): the work has been undone."
            )
        if name in self._ran:
            raise ValueError(f"The phase {name!r} has already run in this request.")
        for done in self.points:
            if done[0] == name:
                self._ran.add(name)
                return done[1]
        phased = None if claim is None else _phased(store)
        with ExitStack() as stack:
            if atomic:
                using = None if phased is None else phased.transaction_alias()
                stack.enter_context(transaction.atomic(using=using))
            value = _json_round_trip(function(), what=f"The phase {name!r}")
            point: Point = (name, value)
            if compensate is not None:
                point = (name, value, {"compensation": compensate})
            points = (*self.points, point)
            saved = claim is None or phased is None or phased.save_recovery_points(claim, points)
            if not saved:
                raise IdempotencyLeaseLost(cast(ClaimRequest, claim).key)
            self.points = points
        self._ran.add(name)
        return value

    def compensate(self, claim: ClaimRequest | None, store: Store | None) -> list[str]:
        """Run the pending compensations of the committed phases, last phase first; the
        names of those run now.

        Each runs in a transaction (on the store's database) that also records it on the
        recovery points, so a local compensation and its record commit together; one that
        raises stops here, leaving it and the earlier phases' pending.
        """
        if _in_event_loop():
            raise RuntimeError("compensate() was called from async code: await acompensate().")
        phased = None if claim is None else _phased(store)
        using = None if phased is None else phased.transaction_alias()
        ran: list[str] = []
        for index in reversed(range(len(self.points))):
            point = self.points[index]
            pending = _pending(point)
            if pending is None:
                continue
            function = get_compensation(pending)
            with transaction.atomic(using=using):
                function(point[1], key=compensation_key(claim, point[0]))
                done = (point[0], point[1], {**point[2], "compensated": True})
                points = (*self.points[:index], done, *self.points[index + 1 :])
                saved = (
                    claim is None or phased is None or phased.save_recovery_points(claim, points)
                )
                if not saved:
                    raise IdempotencyLeaseLost(cast(ClaimRequest, claim).key)
                self.points = points
            ran.append(pending)
            self.compensations_run.append(pending)
        self.compensated = True
        return ran

    def foreign_key(self, name: str, claim: ClaimRequest | None) -> str:
        """The key for the call ``name`` to another service; see ``Run.foreign_key``."""
        derived = self._foreign_keys.get(name)
        if derived is None:
            if claim is None:
                derived = uuid.uuid4().hex
            else:
                derived = digest([claim.scope, claim.key, claim.fingerprint, name])
            self._foreign_keys[name] = derived
        return derived


def compensation_started(points: Points) -> bool:
    """Whether a compensation of these points has run: the work is being undone, and a retry
    must not resume it."""
    return any(_declared(point) and point[2].get("compensated") for point in points)


# -- Requests abandoned mid-way ---------------------------------------------------------------


@dataclass
class Compensation:
    """What :func:`compensate_abandoned` did with one abandoned key."""

    scope: str
    key: str
    #: ``"compensated"`` (every compensation has run, the key is finished), ``"failed"`` (a
    #: compensation raised: see ``error``; the rest are pending), ``"busy"`` (a live request
    #: or another compensation holds the key) or ``"nothing"`` (no phase has a compensation).
    outcome: str
    #: The compensations run now, in order.
    ran: list[str] = field(default_factory=list)
    #: The compensations still pending, in the order they will run.
    pending: list[str] = field(default_factory=list)
    error: str | None = None


def compensate_abandoned(
    *,
    scope: str | None = None,
    key: str | None = None,
    status: int = 500,
    using: str | None = None,
) -> list[Compensation]:
    """Compensate the requests abandoned mid-way (``IdempotencyKey.objects.abandoned()``).

    For each key (of ``scope`` and ``key`` when given) whose committed phases declare
    compensations: take the key over as a retry would (so no retry, and no second
    compensation, runs meanwhile), run its pending compensations in reverse order, each once
    (:meth:`Phases.compensate`), then mark the key finished without a response, so that its
    retries get ``409 idempotency_response_not_stored`` naming ``status`` as the original
    status. A compensation that raises leaves the key unfinished, its lease ended, with the
    remaining compensations pending: calling this again resumes them. Returns what happened
    to each key, oldest first.
    """
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status code (100-599), not {status!r}.")
    store = _store_on(_phased(get_store()), using)
    keys = IdempotencyKey.objects.using(store.transaction_alias()).abandoned()
    if scope is not None:
        keys = keys.filter(scope=scope)
    if key is not None:
        keys = keys.filter(key=key)
    rows = list(keys.order_by("created_at", "pk"))
    return [_compensate_key(store, row, status) for row in rows]


def _compensate_key(store: PhasedStore, row: IdempotencyKey, status: int) -> Compensation:
    outcome = Compensation(scope=row.scope, key=row.key, outcome="busy")
    if not any(_declared(point) for point in _stored_points(row.recovery_points)):
        outcome.outcome = "nothing"
        return outcome
    claim = ClaimRequest(
        scope=row.scope,
        key=row.key,
        fingerprint=row.fingerprint,
        method=row.method,
        path=row.path,
        token=uuid.uuid4().hex,
        ttl=conf.IDEMPOTENCY_TTL,
    )
    try:
        # Taken over as the request's own retry would: only once its lease has passed.
        record = store.claim(claim, lease=conf.IDEMPOTENCY_LEASE, insert=False)
    except KeyLocked:
        return outcome  # a live request holds it, or it went away
    if record.owner_token != claim.token:
        return outcome  # a retry, or another compensation, took it first
    phases = Phases()
    phases.resume(record.recovery_points)
    heartbeat = Heartbeat(store, claim, conf.IDEMPOTENCY_LEASE)
    try:
        phases.compensate(claim, store)
    except Exception as exc:
        heartbeat.stop()
        outcome.outcome, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
        outcome.ran = phases.compensations_run
        outcome.pending = [name for name in map(_pending, reversed(phases.points)) if name]
        # For the next attempt to take over at once; if that fails, once the lease passes.
        with suppress(IdempotencyStoreUnavailable, KeyLocked):
            store.end_lease(claim)
        return outcome
    heartbeat.stop()
    outcome.ran = phases.compensations_run
    if store.complete(claim, StoredResponse(status=status, headers=[], body=None)):
        outcome.outcome = "compensated"
    else:
        outcome.outcome, outcome.error = "failed", "the key was taken over before it finished"
    return outcome


def _store_on(store: PhasedStore, using: str | None) -> PhasedStore:
    """``store``, on the database ``using`` (a ``DatabaseStore``'s ``using``) when given."""
    if using is None or using == store.transaction_alias():
        return store
    if not hasattr(store, "using"):
        raise ImproperlyConfigured(
            f"{type(store).__name__} cannot be pointed at the database {using!r}."
        )
    moved = copy.copy(store)
    moved.using = using
    return moved


def _stored_points(value: Any) -> Points:
    """A ``recovery_points`` column's ``[[name, result(, compensation)], ...]`` as tuples."""
    return tuple((str(point[0]), *point[1:]) for point in value or ())


def _declared(point: Point) -> str | None:
    """The compensation ``point``'s phase declared, or ``None``."""
    if len(point) > 2 and isinstance(point[2], dict):
        return cast(str | None, point[2].get("compensation"))
    return None


def _pending(point: Point) -> str | None:
    """The compensation ``point``'s phase declared, unless it has run; else ``None``."""
    declared = _declared(point)
    return None if declared is None or point[2].get("compensated") else declared


def _qualified(function: Callable[..., Any]) -> str:
    return f"{function.__module__}.{getattr(function, '__qualname__', function)}"


def _phased(store: Store | None) -> PhasedStore:
    """The store of a run that owns its key, if it keeps recovery points."""
    if not getattr(store, "supports_phases", False):
        raise ImproperlyConfigured(
            f"{type(store).__name__} cannot keep recovery points; phases need the DatabaseStore."
        )
    return cast(PhasedStore, store)


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
