"""A claim protocol measured against the kept one by ``benchmarks/protocols.py`` (issue #16).

A measurement prototype, not a store to deploy: it runs the atomic mode of the benchmark's
views on PostgreSQL and nothing else. docs/scaling.md, "A cheaper first execution", has its
figures and why the package does not claim this way.

:class:`InTransactionClaimStore`: the claim row is inserted inside the view's transaction
rather than committed before it, so one commit stores it with the view's writes. A duplicate's
insert waits on the uncommitted row (the connection's ``lock_timeout`` bounds the wait), and
cannot see its fingerprint: a different request in flight would get 409, not 422.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from django.db import connections
from django.db import transaction as db_transaction

from django_idempotency.records import IN_PROGRESS, ClaimRequest, Record
from django_idempotency.stores import DatabaseStore
from django_idempotency.stores.base import owned_record, translate_errors
from django_idempotency.stores.sql import PostgresqlStatements, claim_values


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
