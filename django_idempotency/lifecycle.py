"""One claim's pass through the protocol, as a state machine: begin, run the work, finish.

Whatever drives a :class:`Run` (an HTTP request through ``adapters.Execution``, a function
call or a task through ``functions.IdempotentCall``), every rule about claiming, waiting,
replaying, storing, releasing and leases is here, once.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import timedelta
from typing import Any, TypeVar, cast

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

from django_idempotency import encryption, signals
from django_idempotency.checks import ensure_valid_settings
from django_idempotency.conf import conf, get_store
from django_idempotency.exceptions import (
    IdempotencyKeyInProgress,
    IdempotencyKeyMismatch,
    IdempotencyResponseNotStored,
    IdempotencyStoreUnavailable,
)
from django_idempotency.heartbeat import Heartbeat
from django_idempotency.models import keys_database
from django_idempotency.phases import Phases, compensation_started
from django_idempotency.records import ClaimRequest, Record, StoredResponse
from django_idempotency.stores import KeyLocked, KeyVanished, PhasedStore, Store

logger = logging.getLogger("django_idempotency")

_Run = TypeVar("_Run", bound="Run")
_Found = TypeVar("_Found")


class State(enum.Enum):
    """Where a run is. ``NEW`` → ``CLAIMED``/``REPLAYED``/``UNPROTECTED``; a claimed run →
    ``FINISHED`` or ``FAILED``, then, when it ends, ``COMPLETED`` or ``RELEASED``."""

    #: Not begun; also a request that is not covered, or carries no key.
    NEW = "new"
    #: The key was used before: the completed record is the answer, the work does not run.
    REPLAYED = "replayed"
    #: The store was unreachable and ``IDEMPOTENCY_FAIL_OPEN`` let the work run unprotected.
    UNPROTECTED = "unprotected"
    #: This run owns the key (in the atomic mode, inside its transaction); the work runs.
    CLAIMED = "claimed"
    #: The outcome was handed to the store; in the atomic mode it commits when the run ends.
    FINISHED = "finished"
    #: The work failed (it raised, or left nothing to store): the key is freed when it ends.
    FAILED = "failed"
    #: Ended after its work finished: committed, the outcome stored (unless the lease-mode
    #: store failed or the lease was lost, which the log says).
    COMPLETED = "completed"
    #: Ended after its work failed: rolled back, the key freed (or, with committed phases,
    #: its lease ended for a retry to resume).
    RELEASED = "released"
    #: Ended without owning a key.
    CLOSED = "closed"


# Every transition, in one place.
_NEXT: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.CLAIMED, State.REPLAYED, State.UNPROTECTED, State.CLOSED}),
    State.REPLAYED: frozenset({State.CLOSED}),
    State.UNPROTECTED: frozenset({State.CLOSED}),
    State.CLAIMED: frozenset({State.FINISHED, State.FAILED, State.COMPLETED}),
    # An atomic-mode run whose block raised after its outcome was written: rolled back.
    State.FINISHED: frozenset({State.COMPLETED, State.FAILED}),
    State.FAILED: frozenset({State.RELEASED}),
    State.COMPLETED: frozenset(),
    State.RELEASED: frozenset(),
    State.CLOSED: frozenset(),
}
_ENDED = frozenset({State.COMPLETED, State.RELEASED, State.CLOSED})
# Where phases may run: the work has not finished (unprotected without a claim).
_WORKING = frozenset({State.NEW, State.UNPROTECTED, State.CLAIMED})


class Run:
    """One claim's pass through the protocol, whatever made it: a request or a function call.

    * :meth:`begin` claims the key: ``None`` means run the work (this run owns the key, or the
      store is down and ``IDEMPOTENCY_FAIL_OPEN`` lets the work run unprotected); otherwise it
      returns the completed record to replay. It raises :class:`IdempotencyError` for an
      answer of this layer.
    * :meth:`finish` stores the work's outcome (or, with ``None``, releases the key).
    * :meth:`fail` marks the work as failed, for the end of the ``with`` block to release;
      :meth:`abort` fails and ends at once (the async adapters, which have no block).
    * :meth:`phase` runs one named phase of the work once, across retries, and
      :meth:`foreign_key` derives a key for a call to another service.
    * Leaving the context (or :meth:`end`) ends the run: the atomic mode's transaction
      commits, or rolls back when the work failed; a failed claim is released.
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
        self.state = State.NEW
        self._phases = Phases()
        # Set by begin() when the run claims the key; the transaction in the atomic mode, the
        # heartbeat in the lease mode.
        self._claim: ClaimRequest | None = None
        self._store: Store | None = None
        self._context: Any = None
        self._transaction: _Transaction | None = None
        self._heartbeat: Heartbeat | None = None
        #: What finish() stored, for the signal sent once it is committed.
        self._stored: StoredResponse | None = None
        #: Whether finish() stored the work's outcome with its body, for retries to replay.
        self.replayable = False

    # Context manager: the sync adapters' way in and out.

    def __enter__(self: _Run) -> _Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None:
            self.fail()
        self.end()

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
        return self._phases.resumed_after

    def _to(self, state: State) -> None:
        assert state in _NEXT[self.state], f"{self.state} -> {state}"
        self.state = state

    # The protocol.

    def begin(self, claim: ClaimRequest, context: Any = None) -> Record | None:
        """Claim ``claim``'s key; ``context`` (the request, or ``None``) goes to the signals."""
        ensure_valid_settings()  # where no `manage.py check` ran: before any store call
        store = get_store()
        atomic = _atomic_mode(store, self.atomic, is_async=self.is_async)
        self._context = context
        wait = conf.IDEMPOTENCY_WAIT if self.wait is None else self.wait
        try:
            found = _waiting(lambda: _claim_once(store, claim, atomic=atomic), wait)
        except IdempotencyStoreUnavailable:
            if not _fail_open(store, context, claim):
                raise
            self._to(State.UNPROTECTED)
            return None
        except IdempotencyKeyInProgress:
            _signal("key_in_progress", store, context, claim)
            raise
        except IdempotencyKeyMismatch:
            _signal("key_mismatch", store, context, claim)
            raise
        if isinstance(found, Record):
            found = encryption.opened(found, claim)  # 503 if it cannot be decrypted
            self._to(State.REPLAYED)
            assert found.response is not None
            _signal("response_replayed", store, context, claim, status=found.response.status)
            return found
        if compensation_started(found.record.recovery_points):
            # Its work is being undone (`idempotency_abandoned --compensate` resumes that): a
            # retry must not resume the work, so it waits, as for a live request.
            _give_back(store, claim, found)
            _signal("key_in_progress", store, context, claim)
            raise IdempotencyKeyInProgress(retry_after=1)
        self._claim, self._store, self._transaction = claim, store, found.transaction
        self._phases.resume(found.record.recovery_points)
        if not atomic:
            self._heartbeat = Heartbeat(store, claim, conf.IDEMPOTENCY_LEASE)
        self._to(State.CLAIMED)
        if found.taken_over is not None:
            _signal("key_taken_over", store, context, claim, reason=found.taken_over)
        mode = "lease" if self._transaction is None else "atomic"
        _signal("key_claimed", store, context, claim, mode=mode)
        return None

    def finish(
        self, stored: StoredResponse | None, *, ending: bool = False
    ) -> IdempotencyStoreUnavailable | None:
        """Store the work's outcome, or release the key for ``None`` (nothing to store).

        Returns the store's failure when it left nothing behind (the atomic mode rolled the
        work back), for the adapter to report; ``None`` otherwise. In the lease mode the run
        ends here; in the atomic mode when its block ends, which commits the transaction, or
        here too with ``ending``: the caller does nothing more in the transaction, so the store
        may commit it with the stored outcome (``complete_and_commit``).
        """
        if self.state is State.FAILED:
            self.end()
            return None
        if self.state is not State.CLAIMED:
            return None
        try:
            if stored is None:
                self._to(State.FAILED)
            else:
                self._complete(stored, ending=ending)
        except IdempotencyStoreUnavailable as exc:
            if self._transaction is None:
                # Lease mode: the work has run and committed; its outcome is the truth. The
                # claim stays in place until its lease passes, holding retries off that long.
                logger.error(
                    "Could not store the response (or result) for key %r.",
                    cast(ClaimRequest, self._claim).key,
                )
                self.end()
                return None
            # Atomic mode: roll the work's writes back with the claim; nothing happened.
            self._to(State.FAILED)
            self.end()
            return exc
        if self._transaction is None or ending:
            self.end()
        return None

    def fail(self) -> None:
        """Mark the work as failed: nothing is stored, and the key is freed when the run ends."""
        if self.state in (State.CLAIMED, State.FINISHED):
            self._to(State.FAILED)
            self.replayable = False  # the atomic mode rolls the stored outcome back

    def abort(self) -> None:
        """Fail and end at once: the work raised (the async adapters' ``__exit__``)."""
        self.fail()
        self.end()

    def end(self) -> None:
        """End the run (once): commit or roll back the atomic mode's transaction, stop the
        heartbeat, free a failed claim, and signal a stored outcome once it is committed."""
        state = self.state
        if state in _ENDED:
            return
        if state not in (State.CLAIMED, State.FINISHED, State.FAILED):
            self._to(State.CLOSED)
            return
        failed = state is State.FAILED
        self._to(State.RELEASED if failed else State.COMPLETED)
        if self._heartbeat is not None:
            self._heartbeat.stop()
        atomic = self._transaction is not None
        if self._transaction is not None:
            open_transaction, self._transaction = self._transaction, None
            open_transaction.end(rollback=failed)
        claim, store = cast(ClaimRequest, self._claim), cast(Store, self._store)
        if failed:
            if self._phases.compensated:
                _close_compensated(store, claim)
            else:
                _free(store, claim, keep_phases=bool(self._phases.points) and not atomic)
        elif self._stored is not None:
            # Sent once committed: in the atomic mode, with the work's writes.
            stored = self._stored
            _signal(
                "response_stored",
                store,
                self._context,
                claim,
                status=stored.status,
                replayable=stored.body is not None,
            )
        self._stored = None

    def _complete(self, stored: StoredResponse, *, ending: bool) -> None:
        claim, store = cast(ClaimRequest, self._claim), cast(Store, self._store)
        if self._heartbeat is not None:
            self._heartbeat.stop()
        stored = encryption.for_storage(stored, claim, self._context)  # redacted, sealed
        complete = store.complete
        if ending and self._transaction is not None:
            complete = getattr(store, "complete_and_commit", complete)
        if complete(claim, stored):
            self._stored = stored
            self.replayable = stored.body is not None
        else:
            # Only in the lease mode: our lease passed and another request took the key over
            # (the heartbeat failed to renew it). Its record stands; ours is not written.
            logger.warning(
                "Idempotency key %r lost its lease before its response could be stored.",
                claim.key,
            )
        self._to(State.FINISHED)

    # Phases.

    def phase(
        self,
        name: str,
        function: Callable[[], Any],
        *,
        atomic: bool = True,
        compensate: str | None = None,
    ) -> Any:
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

        ``compensate`` names the compensation that undoes the phase (registered with
        ``django_idempotency.phases.compensation``; an unknown name raises ``LookupError``
        before the phase runs): :meth:`compensate`, or ``idempotency_abandoned
        --compensate`` for a request abandoned mid-way, runs it with the phase's result.
        """
        if self.state not in _WORKING:
            raise RuntimeError(
                f"The phase {name!r} comes after its request or call has finished (its result "
                "is saved, or it was replayed): there is nothing left to protect it."
            )
        return self._phases.run(
            name,
            function,
            atomic=atomic,
            compensate=compensate,
            claim=self._claim,
            store=self._store,
        )

    async def aphase(
        self,
        name: str,
        function: Callable[[], Any],
        *,
        atomic: bool = True,
        compensate: str | None = None,
    ) -> Any:
        """:meth:`phase` for async views: ``function`` (sync) runs in the request's thread."""
        return await sync_to_async(self.phase)(name, function, atomic=atomic, compensate=compensate)

    def compensate(self) -> list[str]:
        """Undo the committed phases: run their compensations, last phase first, each once.

        Each compensation runs in a transaction that also records it on the key, and gets
        the phase's result and its own derived key. Returns the names of those run now. After
        it, no phase may run, and the key is finished either way: a response the work then
        returns is stored as usual; if the work raises (or its response is not stored), the
        key is finished without a response, and retries get ``409
        idempotency_response_not_stored`` (original status 500). A compensation that raises
        stops there: the key keeps its recovery points, with the rest pending, for
        ``idempotency_abandoned --compensate`` to finish; once one has run, retries get
        ``409 idempotency_key_in_progress`` rather than resume the work.
        Lease mode only (``atomic=False``): the atomic mode rolls its phases back instead.
        """
        if self._transaction is not None:
            raise RuntimeError(
                "compensate() needs the lease mode (atomic=False): in the atomic mode a failure "
                "rolls the phases back with the work's transaction."
            )
        if self.state not in _WORKING:
            raise RuntimeError(
                "compensate() comes after its request or call has finished: nothing is left "
                "to protect it."
            )
        return self._phases.compensate(self._claim, self._store)

    async def acompensate(self) -> list[str]:
        """:meth:`compensate` for async views, in the request's thread."""
        return await sync_to_async(self.compensate)()

    def foreign_key(self, name: str) -> str:
        """The idempotency key for the call ``name`` to another service, derived from this key.

        The same for every attempt at this key and request (scope, key and fingerprint), so a
        retried call is deduplicated by the other service too; different for every ``name``.
        Without a claimed key (no key sent, or failing open), a random key per run.
        """
        return self._phases.foreign_key(name, self._claim)


# -- Claiming -------------------------------------------------------------------------------


class _Transaction:
    """The atomic mode's transaction (the store's ``lock()`` context), open while the work runs."""

    def __init__(self, stack: ExitStack, using: str) -> None:
        self._stack, self._using = stack, using

    def end(self, *, rollback: bool) -> None:
        if rollback:
            # Left normally, marked so that Django rolls it back (and the claim with it).
            transaction.set_rollback(True, using=self._using)
        self._stack.close()


class _Owned:
    """A claim that succeeded: the record it owns, what it replaced, its open transaction."""

    def __init__(
        self, record: Record, taken_over: str | None, transaction: _Transaction | None
    ) -> None:
        self.record, self.taken_over, self.transaction = record, taken_over, transaction


def _atomic_mode(store: Store, atomic: bool | None, *, is_async: bool) -> bool:
    if atomic is None:
        return store.supports_atomic and not is_async
    if atomic and not store.supports_atomic:
        raise ImproperlyConfigured(
            f"{conf.IDEMPOTENCY_STORE} has no atomic mode; use atomic=False with it."
        )
    return atomic


def _waiting(attempt: Callable[[], _Found], wait: timedelta) -> _Found:
    """``attempt()``, tried again while a live request holds the key, until ``wait`` has
    passed: after 10 ms, then twice as long each time, up to 250 ms between tries."""
    deadline = time.monotonic() + wait.total_seconds()
    delay = 0.01
    vanished = False
    while True:
        try:
            return attempt()
        except KeyLocked as locked:
            if isinstance(locked, KeyVanished) and not vanished:
                # The row went away under us (released or purged): try once more at once.
                vanished = True
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise IdempotencyKeyInProgress(retry_after=locked.retry_after) from None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.25)


def _claim_once(store: Store, claim: ClaimRequest, *, atomic: bool) -> _Owned | Record:
    """One try at ``claim``: the claim owned, or the completed record to replay. Raises
    :class:`KeyLocked` while a live request holds the key."""
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
    taken_over = None
    if previous is not None and previous.owner_token != claim.token:
        # What the claim replaces, should it succeed.
        taken_over = "abandoned" if previous.live else "expired"
    if not atomic:
        found = _decide(store.claim(claim, lease=conf.IDEMPOTENCY_LEASE, insert=insert), claim)
        return found if isinstance(found, Record) else _Owned(found.record, taken_over, None)
    using = _transaction_alias(store)  # now: a store may change its database later
    with ExitStack() as stack:
        try:
            locked = stack.enter_context(store.lock(claim, insert=insert))
        except KeyLocked:
            if record is not None and record.fingerprint != claim.fingerprint:
                # A live request holds the key for a different request: that one may
                # finish, this one never will with this key.
                raise IdempotencyKeyMismatch() from None
            raise
        found = _decide(locked, claim)
        if isinstance(found, Record):
            return found
        # Open until the work has finished: the run ends it.
        return _Owned(found.record, taken_over, _Transaction(stack.pop_all(), using))


def _decide(record: Record, claim: ClaimRequest) -> _Owned | Record:
    """What a record found by a claim means: owned (run the work), or a replay."""
    if record.owner_token == claim.token:
        return _Owned(record, None, None)
    if record.completed:
        return _completed(record, claim)
    if record.fingerprint != claim.fingerprint:
        raise IdempotencyKeyMismatch()
    # The lease says when a dead request's key may be taken over, not when a live one will
    # finish: suggest an early retry (Retry-After: 1) rather than the lease's remaining time.
    raise KeyLocked()


def _completed(record: Record, claim: ClaimRequest) -> Record:
    """A completed record found for ``claim``, checked: the same request, with its outcome kept."""
    if record.fingerprint != claim.fingerprint:
        raise IdempotencyKeyMismatch()
    assert record.response is not None
    if record.response.body is None:
        raise IdempotencyResponseNotStored(original_status=record.response.status)
    return record


# -- Ending ---------------------------------------------------------------------------------


def _transaction_alias(store: Store) -> str:
    """The database of the atomic mode's transaction: the store's, else the keys' database."""
    alias = getattr(store, "transaction_alias", None)
    return alias() if callable(alias) else keys_database()


def _free(store: Store, claim: ClaimRequest, *, keep_phases: bool) -> None:
    """Free a failed run's key, so a retry may use it at once."""
    if keep_phases:
        # Committed phases are kept for the retry to resume from: the claim stays, and its
        # lease ends now, so a retry takes it over at once.
        try:
            cast(PhasedStore, store).end_lease(claim)
        except (IdempotencyStoreUnavailable, KeyLocked):
            logger.exception("Could not end the lease of idempotency key %r.", claim.key)
        return
    try:
        store.release(claim)
    except (IdempotencyStoreUnavailable, KeyLocked):
        # The claim stays until a retry takes it over (atomic mode: at once, as its lock is
        # free; lease mode: once its lease has passed).
        logger.exception("Could not release idempotency key %r.", claim.key)


def _give_back(store: Store, claim: ClaimRequest, found: _Owned) -> None:
    """Undo a claim that took over a key whose compensation has begun, leaving it as it was."""
    if found.transaction is not None:
        found.transaction.end(rollback=True)  # the takeover rolls back with it
        return
    try:
        cast(PhasedStore, store).end_lease(claim)
    except (IdempotencyStoreUnavailable, KeyLocked):
        logger.exception("Could not end the lease of idempotency key %r.", claim.key)


def _close_compensated(store: Store, claim: ClaimRequest) -> None:
    """Finish a failed run's key whose work was compensated: no retry may run it again."""
    try:
        store.complete(claim, StoredResponse(status=500, headers=[], body=None))
    except IdempotencyStoreUnavailable:
        # Left to its lease; a retry then finds its compensations done, and waits (409).
        logger.exception("Could not finish the compensated idempotency key %r.", claim.key)


# -- Policy and signals ---------------------------------------------------------------------


def _fail_open(store: Store, context: Any, claim: ClaimRequest) -> bool:
    """Whether to run the work unprotected now that the store is unreachable (called while
    handling that error, whose traceback the warning logs)."""
    fail_open = conf.IDEMPOTENCY_FAIL_OPEN
    _signal("store_unavailable", store, context, claim, fail_open=fail_open)
    if fail_open:
        # IDEMPOTENCY_FAIL_OPEN: the project chose availability over protection.
        logger.warning(
            "The idempotency store is unavailable: running %s for key %r "
            "unprotected (IDEMPOTENCY_FAIL_OPEN).",
            "the view" if context is not None else "the call",
            claim.key,
            exc_info=True,
        )
    return fail_open


def _signal(name: str, store: Store, context: Any, claim: ClaimRequest, **details: Any) -> None:
    signals.send(name, store, context, claim.scope, claim.key, **details)
