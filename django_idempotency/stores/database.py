"""``DatabaseStore``: keys in the ``IdempotencyKey`` table, claimed by unique constraint and row
locks. What each step means lives here; the statements it sends are a strategy (``sql``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta

from django.db import connections
from django.db import transaction as db_transaction

from django_idempotency import replay_cache
from django_idempotency.models import keys_database
from django_idempotency.records import ClaimRequest, Record, StoredResponse
from django_idempotency.stores.base import (
    KeyVanished,
    may_take_over,
    owned_record,
    translate_errors,
)
from django_idempotency.stores.sql import (
    Locked,
    RecoveryPoints,
    Statements,
    StatementsKind,
    statements_for,
)


class DatabaseStore:
    """Keys in the ``IdempotencyKey`` table, claimed by unique constraint and row locks.

    The database alias is ``IDEMPOTENCY_DATABASE``, else the router's choice for writing
    ``IdempotencyKey`` (``models.keys_database``), for reads too: never a read replica. A
    subclass may pin ``using``. Every deadline is compared with the database's own clock.
    ``statements`` picks how the statements are written: ``"auto"`` (plain SQL on PostgreSQL and
    MariaDB/MySQL, the ORM elsewhere) or ``"orm"`` (the ORM everywhere).
    """

    supports_atomic = True
    supports_phases = True
    using: str | None = None
    statements: StatementsKind = "auto"

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

    def get_or_claim(
        self, claim: ClaimRequest, *, lease: timedelta | None
    ) -> tuple[Record | None, bool]:
        alias = self._alias()
        with translate_errors(alias):
            statements = self._statements(alias)
            if lease is None and not connections[alias].features.has_select_for_update:
                # SQLite's atomic mode claims inside its transaction (see lock()): only read.
                return statements.get(claim.scope, claim.key), False
            return statements.get_or_insert(claim, lease=lease)

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

    @contextmanager
    def lock(
        self, claim: ClaimRequest, *, insert: bool = True, claimed: bool = False
    ) -> Iterator[Record]:
        alias = self._alias()
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
                inserted = claimed or (early and statements.insert(claim, lease=None))
                transaction.enter_context(db_transaction.atomic(using=alias))
                if inserted:  # ours, unless a duplicate took it over before we locked it
                    owned = statements.lock_own(claim)
                else:  # SQLite: the insert is inside the transaction, and then ours
                    owned = insert and not early and statements.insert(claim, lease=None)
                record = owned_record(claim) if owned else self._take(statements, claim, lease=None)
            yield record

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        alias = self._alias()
        with translate_errors(alias):
            return self._statements(alias).complete(claim, response)

    def release(self, claim: ClaimRequest) -> bool:
        alias = self._alias()
        with translate_errors(alias):
            return self._statements(alias).release(claim)

    def renew(self, claim: ClaimRequest, *, lease: timedelta) -> bool:
        alias = self._alias()
        with translate_errors(alias):
            return self._statements(alias).renew(claim, lease=lease)

    def save_recovery_points(self, claim: ClaimRequest, points: RecoveryPoints) -> bool:
        alias = self._alias()
        with translate_errors(alias):
            return self._statements(alias).save_recovery_points(claim, points)

    def end_lease(self, claim: ClaimRequest) -> bool:
        alias = self._alias()
        with translate_errors(alias):
            return self._statements(alias).end_lease(claim)

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
        if record is not None:
            self._remember(scope, key, record)
        return record

    @staticmethod
    def _remember(scope: str, key: str, record: Record) -> None:
        if record.completed and record.live and record.expires_in:
            # A miss (the cache was restarted, or evicted the copy): refill it for the rest of
            # the key's life, so the next replay needs no query again.
            assert record.response is not None
            remaining = timedelta(seconds=record.expires_in)
            replay_cache.remember(scope, key, record.fingerprint, record.response, remaining)

    def get_or_insert(
        self, claim: ClaimRequest, *, lease: timedelta | None
    ) -> tuple[Record | None, bool]:
        cached = replay_cache.lookup(claim.scope, claim.key)
        if cached is not None:
            return cached, False
        record, inserted = self._statements.get_or_insert(claim, lease=lease)
        if record is not None:
            self._remember(claim.scope, claim.key, record)
        return record, inserted

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        completed = self._statements.complete(claim, response)
        if completed and response.body is not None:
            db_transaction.on_commit(
                lambda: replay_cache.remember(
                    claim.scope, claim.key, claim.fingerprint, response, claim.ttl
                ),
                using=self.alias,
            )
        return completed

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
