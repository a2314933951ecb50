"""``DatabaseStore``: keys in the ``IdempotencyKey`` table, claimed by unique constraint and
advisory or row locks. What each step means lives here; the statements it sends are a
strategy (``sql``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from typing import Literal, cast

from django.core.exceptions import ImproperlyConfigured
from django.db import Error, connections
from django.db import transaction as db_transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from django_idempotency import replay_cache
from django_idempotency.exceptions import IdempotencyKeyMismatch, IdempotencyStoreUnavailable
from django_idempotency.models import keys_database
from django_idempotency.records import ClaimRequest, Record, StoredResponse
from django_idempotency.stores.base import (
    KeyLocked,
    KeyVanished,
    may_take_over,
    owned_record,
    translate_errors,
)
from django_idempotency.stores.sql import (
    AdvisoryStatements,
    KeyLocksRefused,
    Locked,
    MysqlStatements,
    PostgresqlStatements,
    RecoveryPoints,
    Statements,
    StatementsKind,
    statements_for,
)

logger = logging.getLogger("django_idempotency")

#: How the atomic mode claims an absent key (``DatabaseStore.claims``).
ClaimsKind = Literal["auto", "rows"]


class DatabaseStore:
    """Keys in the ``IdempotencyKey`` table, claimed by unique constraint and advisory or row
    locks.

    The database alias is ``IDEMPOTENCY_DATABASE``, else the router's choice for writing
    ``IdempotencyKey`` (``models.keys_database``), for reads too: never a read replica. A
    subclass may pin ``using``. Every deadline is compared with the database's own clock.
    ``statements`` picks how the statements are written: ``"auto"`` (plain SQL on PostgreSQL and
    MariaDB/MySQL, the ORM elsewhere) or ``"orm"`` (the ORM everywhere); ``claims`` how the
    atomic mode claims an absent key (docs/stores.md, "How the atomic mode claims a key").
    """

    supports_atomic = True
    supports_phases = True
    using: str | None = None
    statements: StatementsKind = "auto"
    #: How the atomic mode claims an absent key: ``"auto"``, with advisory locks where the
    #: statements have them (plain SQL: PostgreSQL's transaction locks; MariaDB/MySQL's
    #: ``GET_LOCK`` when the store's transaction is the outermost), its row written once,
    #: completed, with the view's writes; ``"rows"``, with a claim row committed before the
    #: view runs, then locked (every database; the only way on SQLite and with the ORM).
    claims: ClaimsKind = "auto"

    def _alias(self) -> str:
        return self.using or keys_database()

    def transaction_alias(self) -> str:
        """The database whose transactions commit a phase's writes with its recovery point."""
        return self._alias()

    def _statements(self, alias: str) -> Statements:
        statements = statements_for(connections[alias], self.statements)
        # The one place the store meets the replay cache: in front of its statements.
        return ReplayCached(statements) if replay_cache.enabled() else statements

    def get(self, *, scope: str, key: str) -> Record | None:
        alias = self._alias()
        with translate_errors(alias):
            return self._statements(alias).get(scope, key)

    def claim(self, claim: ClaimRequest, *, lease: timedelta, insert: bool = True) -> Record:
        alias = self._alias()
        with translate_errors(alias):
            statements = self._statements(alias)
            # A new key is claimed by one autocommitted insert; only an existing row needs
            # the short locking transaction that may take it over.
            if insert and statements.insert(claim, lease=lease):
                return owned_record(claim)
            with db_transaction.atomic(using=alias):
                return self._take(statements, claim, lease=lease)

    def _advisory(self, alias: str) -> bool:
        """Whether the atomic mode claims an absent key with advisory locks on ``alias``."""
        if self.claims not in ("auto", "rows"):
            raise ImproperlyConfigured(
                f"DatabaseStore.claims must be 'auto' or 'rows', not {self.claims!r}."
            )
        if self.claims == "rows":
            return False
        connection = connections[alias]
        strategy = statements_for(connection, self.statements)
        if not isinstance(strategy, PostgresqlStatements | MysqlStatements):
            return False
        # The second read must see a row committed just before the locks were won: only
        # READ COMMITTED (Django's default) gives each statement a fresh snapshot. And with
        # autocommit off, the store's transaction would not end where the locks do.
        connection.ensure_connection()
        if not _reads_committed(connection) or not connection.get_autocommit():
            return False
        if isinstance(strategy, MysqlStatements):
            # GET_LOCK's locks are the session's, released when the store's transaction
            # ends: only where that transaction is the outermost (not under ATOMIC_REQUESTS,
            # not in a caller's atomic block), so that nothing commits after the release.
            return alias not in _LOCKS_REFUSED and not connection.in_atomic_block
        return True

    @contextmanager
    def lock(self, claim: ClaimRequest, *, insert: bool = True) -> Iterator[Record]:
        alias = self._alias()
        with translate_errors(alias):  # _advisory may connect
            advisory_claims = insert and self._advisory(alias)
        if advisory_claims:
            with ExitStack() as transaction:
                with translate_errors(alias):
                    advisory = cast(
                        AdvisoryStatements, statements_for(connections[alias], self.statements)
                    )
                    release = ExitStack()
                    if advisory.session_key_locks:
                        # Entered first, so run last: once the transaction has ended.
                        release.callback(_release_key_locks, advisory, claim)
                        transaction.enter_context(release)
                    transaction.enter_context(db_transaction.atomic(using=alias))
                    found = self._lock_absent(self._statements(alias), claim)
                    if found is None:
                        release.pop_all()  # refused: no lock was taken
                if found is not None:
                    yield found
                    return
            # The database refused the locks (and this alias now claims with rows).
        # With row locks, the claim is committed before the transaction starts: a concurrent
        # duplicate then finds a committed row that it cannot lock (and answers at once)
        # instead of waiting on our uncommitted insert for as long as the view runs. A live
        # request always holds its row's lock, so a claimed row that can be locked belongs to
        # a request that died, and is taken over. SQLite has no row locks: there the claim is
        # inserted inside the transaction, and its database lock serialises writers.
        early = insert and connections[alias].features.has_select_for_update
        with ExitStack() as transaction:
            with translate_errors(alias):  # claiming; errors of the view itself pass untouched
                statements = self._statements(alias)
                inserted = early and statements.insert(claim, lease=None)
                transaction.enter_context(db_transaction.atomic(using=alias))
                if inserted:  # ours, unless a duplicate took it over before we locked it
                    owned = statements.lock_own(claim)
                else:  # SQLite: the insert is inside the transaction, and then ours
                    owned = insert and not early and statements.insert(claim, lease=None)
                record = owned_record(claim) if owned else self._take(statements, claim, lease=None)
            yield record

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        return self._complete(claim, response, commit=False)

    def complete_and_commit(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        """:meth:`complete` as the last statement of the atomic mode's transaction, which the
        caller ends right after. With advisory claims, psycopg's client-side binding and no
        transaction around ours (``ATOMIC_REQUESTS``), the completed row's ``INSERT`` and the
        ``COMMIT`` go in one round trip; Django's own commit then has nothing left to send,
        and runs the ``on_commit`` callbacks as ever."""
        return self._complete(claim, response, commit=True)

    def _complete(self, claim: ClaimRequest, response: StoredResponse, *, commit: bool) -> bool:
        alias = self._alias()
        with translate_errors(alias):
            statements = self._statements(alias)
            unwritten = _unwritten(alias)
            if claim.token not in unwritten:
                return statements.complete(claim, response)
            unwritten.discard(claim.token)
            commit = commit and _sole_transaction(alias)
            advisory = cast(AdvisoryStatements, statements)
            if advisory.insert_completed(claim, response, commit=commit):
                return True
        # A row appeared under our advisory locks: a claim that takes no advisory lock
        # inserted it (the lease mode; row claims, e.g. an instance of an older release or
        # one that fell back to rows). Its request runs, so ours must not commit: the atomic
        # mode rolls our work back and answers 503.
        logger.error(
            "Idempotency key %r was claimed by a request without advisory locks (the lease "
            "mode, or row claims) while an atomic-mode request held it; the atomic-mode "
            "request was rolled back.",
            claim.key,
        )
        raise IdempotencyStoreUnavailable(retry_after=1)

    def release(self, claim: ClaimRequest) -> bool:
        alias = self._alias()
        unwritten = _unwritten(alias)
        if claim.token in unwritten:
            unwritten.discard(claim.token)
            return True  # nothing was written; the locks end with the transaction (or after)
        with translate_errors(alias):
            return self._statements(alias).release(claim)

    def renew(self, claim: ClaimRequest, *, lease: timedelta) -> bool:
        alias = self._alias()
        with translate_errors(alias):
            return self._statements(alias).renew(claim, lease=lease)

    def save_recovery_points(self, claim: ClaimRequest, points: RecoveryPoints) -> bool:
        alias = self._alias()
        if claim.token in _unwritten(alias):
            # No row yet: the points would roll back with the work anyway (the atomic mode).
            return True
        with translate_errors(alias):
            return self._statements(alias).save_recovery_points(claim, points)

    def end_lease(self, claim: ClaimRequest) -> bool:
        alias = self._alias()
        if claim.token in _unwritten(alias):
            return True
        with translate_errors(alias):
            return self._statements(alias).end_lease(claim)

    def _lock_absent(self, statements: Statements, claim: ClaimRequest) -> Record | None:
        """Claim a key the read found absent, with advisory locks (``claims``): no row is
        written until the response is stored, with the view's writes, in one commit.
        ``None`` where the database refuses the locks: the caller claims with rows."""
        try:
            locked, record = cast(AdvisoryStatements, statements).try_key_locks(claim)
        except KeyLocksRefused:
            _LOCKS_REFUSED.add(statements.alias)
            logger.warning(
                "Database %r refused GET_LOCK (a Galera cluster?): the atomic mode claims "
                "keys with rows there. Set DatabaseStore.claims = 'rows' to say so.",
                statements.alias,
            )
            return None
        if not locked and record is not None and record.completed:
            # The holder committed its response as we tried its locks, and is releasing
            # them: the response decides (a replay, or 422), as for any completed key.
            return record
        if locked is None:
            raise KeyLocked()  # the same request is in flight
        if not locked:
            raise IdempotencyKeyMismatch()  # a different request is in flight
        if record is None:
            _unwritten(statements.alias).add(claim.token)
            return owned_record(claim)
        # A row was committed after our read (its request has just finished), or is left
        # from a claim row: decide under its row lock, as for any existing key.
        return self._take(statements, claim, lease=None)

    def _take(
        self, statements: Statements, claim: ClaimRequest, *, lease: timedelta | None
    ) -> Record:
        """Lock the key's row; take it over when it is expired or abandoned."""
        locked = statements.lock(claim.scope, claim.key)
        if locked is None:
            raise KeyVanished()  # deleted between our insert and our lock (a release, a purge)
        record = locked.record
        if record.owner_token == claim.token or not may_take_over(record, claim):
            return record
        # The same request taking over from its own dead attempt resumes after that attempt's
        # last committed phase; anything else starts afresh.
        resumed = not record.completed and record.live and record.fingerprint == claim.fingerprint
        points = locked.recovery_points if resumed else ()
        statements.take_over(locked, claim, lease=lease, points=points)
        return owned_record(claim, points)


def _reads_committed(connection: BaseDatabaseWrapper) -> bool:
    """Whether the connection's transactions read at READ COMMITTED (or below, which both
    databases treat alike here): Django's default on PostgreSQL and MariaDB/MySQL."""
    level = getattr(connection, "isolation_level", None)
    name = str(getattr(level, "name", level) or "").replace("_", " ").lower()
    return name in ("read committed", "read uncommitted")


#: The aliases whose database refused GET_LOCK, for the life of the process.
_LOCKS_REFUSED: set[str] = set()


def _release_key_locks(statements: AdvisoryStatements, claim: ClaimRequest) -> None:
    """Release a claim's session locks after its transaction, whatever ended it."""
    try:
        statements.release_key_locks(claim)
    except Error:
        # Locks left held would refuse the key to every other session for as long as this
        # connection lives: end the session, and its locks with it.
        logger.warning(
            "Releasing the locks of idempotency key %r failed: closing the connection.",
            claim.key,
            exc_info=True,
        )
        connections[statements.alias].close()


def _unwritten(alias: str) -> set[str]:
    """The owner tokens of advisory claims on ``alias`` whose row is not written yet.

    Kept on the connection, so one per alias and thread, as the claims' transactions are.
    A token leaves when its claim is completed or released.
    """
    held: set[str] = connections[alias].__dict__.setdefault(_UNWRITTEN, set())
    return held


_UNWRITTEN = "_django_idempotency_unwritten"


def _sole_transaction(alias: str) -> bool:
    """Whether the connection's one atomic block is a transaction (ours) that nothing has
    marked for rollback, and holds no savepoint: committing it early commits only it."""
    connection = connections[alias]
    return (
        len(connection.atomic_blocks) == 1
        and not connection.savepoint_ids
        and not connection.needs_rollback
    )


class ReplayCached:
    """The store's statements with the replay cache (``IDEMPOTENCY_REPLAY_CACHE``) in front.

    A read is answered from the cache when it holds the key, and a completed key read from
    the database is copied into it for the rest of the key's life; a stored response is copied
    once its transaction commits (in the atomic mode, with the view's writes); a completed
    key that is taken over loses its copy. Every other statement passes through.
    """

    def __init__(self, statements: Statements) -> None:
        self._statements = statements
        self.alias = statements.alias

    def get(self, scope: str, key: str) -> Record | None:
        cached = replay_cache.lookup(scope, key)
        if cached is not None:
            return cached
        record = self._statements.get(scope, key)
        if record is not None and record.completed and record.live and record.expires_in:
            # A miss (the cache was restarted, or evicted the copy): refill it for the rest of
            # the key's life, so the next replay needs no query again.
            assert record.response is not None
            remaining = timedelta(seconds=record.expires_in)
            replay_cache.remember(scope, key, record.fingerprint, record.response, remaining)
        return record

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        completed = self._statements.complete(claim, response)
        if completed:
            self._remember_on_commit(claim, response)
        return completed

    def _remember_on_commit(self, claim: ClaimRequest, response: StoredResponse) -> None:
        if response.body is not None:
            db_transaction.on_commit(
                lambda: replay_cache.remember(
                    claim.scope, claim.key, claim.fingerprint, response, claim.ttl
                ),
                using=self.alias,
            )

    def take_over(
        self,
        locked: Locked,
        claim: ClaimRequest,
        *,
        lease: timedelta | None,
        points: RecoveryPoints,
    ) -> None:
        if locked.record.completed:
            replay_cache.forget([(claim.scope, claim.key)])
        self._statements.take_over(locked, claim, lease=lease, points=points)

    def insert(self, claim: ClaimRequest, *, lease: timedelta | None) -> bool:
        return self._statements.insert(claim, lease=lease)

    def try_key_locks(self, claim: ClaimRequest) -> tuple[bool | None, Record | None]:
        return cast(AdvisoryStatements, self._statements).try_key_locks(claim)

    def insert_completed(
        self, claim: ClaimRequest, response: StoredResponse, *, commit: bool = False
    ) -> bool:
        advisory = cast(AdvisoryStatements, self._statements)
        inserted = advisory.insert_completed(claim, response, commit=commit)
        if inserted:
            self._remember_on_commit(claim, response)
        return inserted

    def lock_own(self, claim: ClaimRequest) -> bool:
        return self._statements.lock_own(claim)

    def lock(self, scope: str, key: str) -> Locked | None:
        return self._statements.lock(scope, key)

    def release(self, claim: ClaimRequest) -> bool:
        return self._statements.release(claim)

    def renew(self, claim: ClaimRequest, *, lease: timedelta) -> bool:
        return self._statements.renew(claim, lease=lease)

    def save_recovery_points(self, claim: ClaimRequest, points: RecoveryPoints) -> bool:
        return self._statements.save_recovery_points(claim, points)

    def end_lease(self, claim: ClaimRequest) -> bool:
        return self._statements.end_lease(claim)
