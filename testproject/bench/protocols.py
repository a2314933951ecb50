"""Claim protocols measured against the kept ones by ``benchmarks/protocols.py`` (issue #16).

Measurement prototypes, not stores to deploy: they run the atomic mode of the benchmark's
views, each on one database and nothing else. docs/scaling.md, "A cheaper first execution",
has their figures and why the package does not claim this way.

:class:`InTransactionClaimStore`: the claim row is inserted inside the view's transaction
rather than committed before it, so one commit stores it with the view's writes. A duplicate's
insert waits on the uncommitted row (the connection's ``lock_timeout`` bounds the wait), and
cannot see its fingerprint: a different request in flight would get 409, not 422.

:class:`GetLockClaimStore` (MariaDB/MySQL): the advisory claims of PostgreSQL with
``GET_LOCK``, whose locks belong to the session, not the transaction: they are released by
one more statement after the commit, and the read that follows the locks is a statement of
its own (no several statements in one round trip with Django's mysqlclient).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from django.db import DatabaseError, connections
from django.db import transaction as db_transaction

from django_idempotency.records import COMPLETED, IN_PROGRESS, ClaimRequest, Record, digest
from django_idempotency.stores import DatabaseStore, StoredResponse
from django_idempotency.stores.base import owned_record, translate_errors
from django_idempotency.stores.sql import (
    _COMPLETED_COLUMNS,
    MysqlStatements,
    PostgresqlStatements,
    Statements,
    claim_values,
)


class InTransactionClaimStore(DatabaseStore):
    """A first execution: SELECT; BEGIN; INSERT the claim; the view; UPDATE; COMMIT."""

    @contextmanager
    def lock(self, claim: ClaimRequest, *, insert: bool = True) -> Iterator[Record]:
        alias = self._alias()
        with ExitStack() as transaction:
            with translate_errors(alias):
                statements = self._statements(alias)
                transaction.enter_context(db_transaction.atomic(using=alias))
                owned = insert and _insert_waiting(alias, claim)
                record = owned_record(claim) if owned else self._take(statements, claim, lease=None)
            yield record


def _insert_waiting(alias: str, claim: ClaimRequest) -> bool:
    """The claim's insert, waiting on a duplicate's uncommitted one up to the connection's
    ``lock_timeout`` (``BENCH_LOCK_TIMEOUT``): no savepoint, no setting changed per request."""
    connection = connections[alias]
    statements = PostgresqlStatements(connection)
    with connection.cursor() as cursor:
        params = [*claim_values(claim, IN_PROGRESS), statements.duration(claim.ttl)]
        cursor.execute(statements._insert_claim, params)
        return bool(cursor.rowcount == 1)


class GetLockClaimStore(DatabaseStore):
    """A first execution on MariaDB: SELECT; BEGIN; GET_LOCK x2; SELECT; the view; INSERT the
    completed row; COMMIT; RELEASE_ALL_LOCKS."""

    def _advisory(self, alias: str) -> bool:
        return connections[alias].vendor == "mysql"

    def _statements(self, alias: str) -> Statements:
        connection = connections[alias]
        if connection.vendor != "mysql":
            return super()._statements(alias)
        statements: Statements = connection.__dict__.setdefault(
            "_bench_get_lock_statements", GetLockStatements(connection)
        )
        return statements

    @contextmanager
    def lock(self, claim: ClaimRequest, *, insert: bool = True) -> Iterator[Record]:
        alias = self._alias()
        try:
            with super().lock(claim, insert=insert) as record:
                yield record
        finally:
            if insert:  # the session's locks outlive the transaction: release them
                try:
                    with connections[alias].cursor() as cursor:
                        cursor.execute("DO RELEASE_ALL_LOCKS()")
                except DatabaseError:
                    pass  # the session is gone, and its locks with it


class GetLockStatements(MysqlStatements):
    """``try_key_locks`` and ``insert_completed`` of :class:`PostgresqlStatements`, in
    MariaDB's words."""

    def try_key_locks(self, claim: ClaimRequest) -> tuple[bool | None, Record | None]:
        names = [
            f"idem:{digest([claim.scope, claim.key, claim.fingerprint])[:40]}",
            f"idem:{digest([claim.scope, claim.key])[:40]}",
        ]
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT IF(GET_LOCK(%s, 0), GET_LOCK(%s, 0), NULL)", names)
            (locked,) = cursor.fetchone()
            if not locked:
                return (None if locked is None else False), None
            # A statement of its own, begun after the locks were won (READ COMMITTED).
            cursor.execute(self._get, [claim.scope, claim.key])
            found = cursor.fetchone()
        return True, None if found is None else self._record(found)

    def insert_completed(
        self, claim: ClaimRequest, response: StoredResponse, *, commit: bool = False
    ) -> bool:
        params: list[Any] = [
            *claim_values(claim, COMPLETED),
            *self._response_values(response),
            self.duration(claim.ttl),
        ]
        columns = ", ".join(self._q(name) for name in _COMPLETED_COLUMNS)
        values = f"%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, {self.now}, {self.now}, {self.later()}"
        with self.connection.cursor() as cursor:
            insert = f"INSERT IGNORE INTO {self._table} ({columns}) VALUES ({values})"
            cursor.execute(insert, params)
            return bool(cursor.rowcount == 1)
