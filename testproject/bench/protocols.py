"""Claim protocols measured against the kept ones by ``benchmarks/protocols.py`` (issue #16).

Measurement prototypes, not stores to deploy: they run the atomic mode of the benchmark's
views, each on one database and nothing else. docs/scaling.md, "A cheaper first execution",
has their figures.

:class:`InTransactionClaimStore`: the claim row is inserted inside the view's transaction
rather than committed before it, so one commit stores it with the view's writes. A duplicate's
insert waits on the uncommitted row (the connection's ``lock_timeout`` bounds the wait), and
cannot see its fingerprint: a different request in flight would get 409, not 422.

:class:`RowClaimsStore`: the kept store with row claims (``claims = "rows"``), measured
against its advisory claims on MariaDB, where those use ``GET_LOCK``.
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


class RowClaimsStore(DatabaseStore):
    """Row claims wherever the store would take advisory locks: what ``kept`` is measured
    against on MariaDB (``DatabaseStore.claims = "rows"``)."""

    claims = "rows"
