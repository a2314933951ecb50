"""What every store shares: the protocols ``core`` talks to, the takeover rule, and the errors.

Nothing here touches a database or Redis, so a project's own store can build on it freely.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import Any, Protocol

from django.db import InterfaceError, OperationalError, ProgrammingError

from django_idempotency.exceptions import IdempotencyStoreUnavailable
from django_idempotency.records import IN_PROGRESS, ClaimRequest, Record, StoredResponse

logger = logging.getLogger("django_idempotency")


class KeyLocked(Exception):
    """Another live request holds the key; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float = 1.0) -> None:
        super().__init__("The idempotency key is held by another request.")
        self.retry_after = retry_after


class KeyVanished(KeyLocked):
    """The key's record went away (or changed) while the store was claiming it: retry at once.

    A release or a purge deleted the row between our insert and our lock, or the cache
    store's record kept changing under it. Nobody holds the key, so ``retry_after`` is 0.
    """

    def __init__(self) -> None:
        super().__init__(retry_after=0)


class Store(Protocol):
    """How ``core`` talks to a store. A project's own store needs no base class.

    The claim rule every store follows: insert the record if the key is absent; if it is
    present, replace it with the caller's when :func:`may_take_over` says so (expired, or
    unfinished and abandoned: its lease passed with the same fingerprint, or in the atomic
    mode its lock is free); otherwise leave it. The caller owns the key when the returned
    record carries its token. Failures to reach the store raise
    :class:`IdempotencyStoreUnavailable`; a key held by a live request may raise
    :class:`KeyLocked`.
    """

    #: Whether :meth:`lock` is available (the atomic mode).
    supports_atomic: bool

    def get(self, *, scope: str, key: str) -> Record | None:
        """The key's record, without locking it, or ``None``."""

    def claim(self, claim: ClaimRequest, *, lease: timedelta, insert: bool = True) -> Record:
        """Claim the key in the lease mode: a short write, fenced by ``claim.token``."""

    def lock(self, claim: ClaimRequest, *, insert: bool = True) -> AbstractContextManager[Record]:
        """Claim and lock the key for the atomic mode.

        The context is a Django transaction (``transaction.atomic``) on the store's
        ``transaction_alias()`` (else ``models.keys_database()``) that stays open while the
        view runs. When the view fails, the run marks it with
        ``transaction.set_rollback(True)`` and leaves it normally: the view's writes roll back
        together with the claim.
        """

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        """Store the response if the caller still owns the key; ``False`` if it does not."""

    def release(self, claim: ClaimRequest) -> bool:
        """Delete the caller's unfinished claim, so a retry may use the key again."""

    def renew(self, claim: ClaimRequest, *, lease: timedelta) -> bool:
        """Extend the caller's lease; ``False`` once the caller no longer owns the key."""


class PhasedStore(Store, Protocol):
    """A store that keeps recovery points, for phases: optional, flagged by ``supports_phases``.

    A claim that takes over an abandoned record (unfinished, live, same fingerprint, lease
    passed) keeps its recovery points, in the returned record's ``recovery_points``; any other
    claim starts with none.
    """

    supports_phases: bool

    def transaction_alias(self) -> str:
        """The database whose transactions commit a phase's writes with its recovery point."""

    def save_recovery_points(
        self, claim: ClaimRequest, points: tuple[tuple[Any, ...], ...]
    ) -> bool:
        """Replace the caller's recovery points; ``False`` once the caller no longer owns the key.

        Written in the caller's transaction, if it is in one, so that an atomic phase's writes
        and its recovery point commit together.
        """

    def end_lease(self, claim: ClaimRequest) -> bool:
        """Give up the caller's unfinished claim, keeping its recovery points for a retry.

        The lease ends now and the owner token is replaced, so that nothing the caller still
        has in flight (a late heartbeat) can renew it. ``False`` if the caller did not own it.
        """


def may_take_over(record: Record, claim: ClaimRequest) -> bool:
    """Whether ``claim`` may replace the existing ``record``: the one takeover rule of every store.

    The caller of a store's atomic mode holds the record's row lock when it asks.
    """
    if record.lease_remaining is not None and record.lease_remaining > 0:
        return False  # a live lease-mode request, even one running past the key's TTL
    if not record.live:
        return True
    if record.completed:
        return False
    if record.lease_remaining is None:
        # An atomic-mode claim whose lock we now hold: its request died (or had not reached
        # its transaction yet) and everything it wrote was rolled back with it, so the key
        # is free, even for a corrected request.
        return True
    # A lease-mode claim whose lease has passed: its request died, perhaps after its side
    # effects, so only the same request may take it over.
    return record.fingerprint == claim.fingerprint


def owned_record(claim: ClaimRequest, points: tuple[tuple[Any, ...], ...] = ()) -> Record:
    """The record of a key ``claim`` has just claimed, with the recovery points it kept."""
    return Record(
        fingerprint=claim.fingerprint,
        state=IN_PROGRESS,
        owner_token=claim.token,
        response=None,
        live=True,
        recovery_points=points,
    )


# -- Database errors ---------------------------------------------------------------------------


def _lock_error(exc: Exception) -> bool:
    """Whether ``exc`` says a row lock was not available (rather than the database failing).

    SQLite's "database is locked" is not one: it means the whole database was busy for longer
    than its timeout, whatever the key, so it is reported as the store being unavailable.
    """
    cause = exc.__cause__
    if getattr(cause, "sqlstate", None) == "55P03":  # PostgreSQL lock_not_available
        return True
    args: tuple[Any, ...] = getattr(cause, "args", ())
    return bool(args) and args[0] in (1205, 3572)  # MySQL/MariaDB lock wait timeout, NOWAIT


# What each database says when a table or column of a model is missing: PostgreSQL's SQLSTATE
# undefined_table and undefined_column, MySQL/MariaDB's error numbers for them (1146, 1054),
# SQLite's messages.
_MISSING_SQLSTATES = frozenset({"42P01", "42703"})
_MISSING_MYSQL_ERRORS = frozenset({1146, 1054})
_MISSING_SQLITE_MESSAGES = ("no such table", "no such column", "has no column named")

NOT_MIGRATED = (
    "The django_idempotency tables are missing or out of date in the database {alias!r}: "
    "run `python manage.py migrate django_idempotency`."
)


def is_missing_schema(exc: BaseException) -> bool:
    """Whether ``exc`` says that a table or column is missing (``migrate`` was not run)."""
    cause = exc.__cause__ or exc
    if getattr(cause, "sqlstate", None) in _MISSING_SQLSTATES:
        return True
    args: tuple[Any, ...] = getattr(cause, "args", ())
    if args and args[0] in _MISSING_MYSQL_ERRORS:
        return True
    message = str(exc)
    return any(text in message for text in _MISSING_SQLITE_MESSAGES)


@contextmanager
def translate_errors(alias: str) -> Iterator[None]:
    """Turn the database errors of a store's statements on ``alias`` into what ``core`` expects.

    A lock conflict becomes :class:`KeyLocked`; a missing table or an outage becomes
    :class:`IdempotencyStoreUnavailable` (503). Any other ``ProgrammingError`` is a bug and
    propagates.
    """
    try:
        yield
    except (OperationalError, InterfaceError, ProgrammingError) as exc:
        if _lock_error(exc):
            raise KeyLocked() from exc
        if is_missing_schema(exc):
            # A deployment that forgot `migrate`: every covered request fails until it runs,
            # so say what to do in the log; the client gets the store-unavailable problem.
            logger.error(NOT_MIGRATED.format(alias=alias))
            raise IdempotencyStoreUnavailable(retry_after=1) from exc
        if isinstance(exc, ProgrammingError):
            raise  # a bug, not an outage: never hidden behind a 503
        raise IdempotencyStoreUnavailable(retry_after=1) from exc
