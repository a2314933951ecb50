"""Phases and recovery points: run each named phase of a run's work once, across retries.

A run's :class:`Phases` keeps the phases committed so far (by this attempt, or by the
abandoned attempts it resumes) and derives keys for calls to other services; the run decides
when phases are allowed and hands in its claim and store (see docs/phases.md).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, cast

from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction

from django_idempotency.exceptions import IdempotencyLeaseLost
from django_idempotency.records import ClaimRequest, digest
from django_idempotency.stores import PhasedStore, Store

#: A run's recovery points: each committed phase's name and (JSON) result, in order.
Points = tuple[tuple[str, Any], ...]


class Phases:
    """The phases of one run: what is committed, what ran in this attempt, foreign keys."""

    def __init__(self) -> None:
        #: The phases committed so far, by this run or by the attempts it resumes.
        self.points: Points = ()
        #: The last phase an abandoned earlier attempt committed, or ``None``.
        self.resumed_after: str | None = None
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
        claim: ClaimRequest | None,
        store: Store | None,
    ) -> Any:
        """Run the phase ``name`` once for ``claim`` (``None``: unprotected); see ``Run.phase``."""
        if _in_event_loop():
            raise RuntimeError(
                f"The phase {name!r} was run from async code: use await run.aphase(...)."
            )
        if name in self._ran:
            raise ValueError(f"The phase {name!r} has already run in this request.")
        for done, result in self.points:
            if done == name:
                self._ran.add(name)
                return result
        phased = None if claim is None else _phased(store)
        with ExitStack() as stack:
            if atomic:
                using = None if phased is None else phased.transaction_alias()
                stack.enter_context(transaction.atomic(using=using))
            value = _json_round_trip(function(), what=f"The phase {name!r}")
            if claim is not None and phased is not None:
                points = (*self.points, (name, value))
                if not phased.save_recovery_points(claim, points):
                    raise IdempotencyLeaseLost(claim.key)
                self.points = points
        self._ran.add(name)
        return value

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
