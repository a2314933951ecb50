"""Claim protocols measured against the kept one by ``benchmarks/protocols.py`` (issue #16).

Measurement prototypes, not stores to deploy: each runs the atomic mode of the benchmark's
views on PostgreSQL and nothing else (no lease mode, no phases, no admin view of in-flight
keys). docs/scaling.md, "A cheaper first execution", has their figures and why the package
keeps its own protocol.

- :class:`AdvisoryLockStore`: no row until the response is stored. The key is claimed with a
  transaction-level advisory lock on a 64-bit hash of (scope, key), taken and checked in one
  statement inside the view's transaction; the completed row is inserted once, by the commit
  that also commits the view's writes. One commit and one row version per key.
- :class:`InTransactionClaimStore`: the claim is inserted inside the view's transaction, not
  committed before it; a duplicate's insert waits on it (``lock_timeout`` bounds the wait).
- :class:`GuardedEarlyClaimStore`: the package's protocol, with the read and the claim in one
  statement whose insert is only tried when the read found nothing (``NOT EXISTS``), so that
  a replay does not try it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from functools import cached_property

from django.db import connections
from django.db import transaction as db_transaction

from django_idempotency.records import COMPLETED, ClaimRequest, Record, StoredResponse
from django_idempotency.stores import DatabaseStore, KeyLocked
from django_idempotency.stores.base import owned_record, translate_errors
from django_idempotency.stores.sql import _BODY, _HEADERS, PostgresqlStatements


class GuardedEarlyClaimStore(DatabaseStore):
    """A first execution: read-or-claim; BEGIN; lock; the view; UPDATE; COMMIT."""

    def _statements(self, alias: str) -> PostgresqlStatements:  # type: ignore[override]
        return _guarded(alias)


class _GuardedStatements(PostgresqlStatements):
    def _get_or_insert(self, insert: str) -> str:
        nulls = ", ".join(["NULL"] * 8)
        head, values = insert.split(" VALUES ", 1)
        values = values.removeprefix("(").removesuffix(") ON CONFLICT DO NOTHING")
        return (
            f"WITH found AS (SELECT {self._get_columns} FROM {self._table} "
            f"WHERE {self._where_key}), "
            f"claimed AS ({head} SELECT {values} WHERE NOT EXISTS (SELECT FROM found) "
            f"ON CONFLICT DO NOTHING RETURNING 1) "
            f"SELECT *, FALSE FROM found UNION ALL SELECT {nulls}, TRUE FROM claimed"
        )

    def get_or_insert(
        self, claim: ClaimRequest, *, lease: timedelta | None
    ) -> tuple[Record | None, bool]:
        statement = self._get_or_insert_claim if lease is None else self._get_or_insert_leased
        params = [claim.scope, claim.key, *self._insert_params(claim, lease)]
        with connections[self.alias].cursor() as cursor:
            cursor.execute(statement, params)
            found = cursor.fetchone()
        if found is None:
            return self.get(claim.scope, claim.key), False
        if found[-1]:
            return None, True
        return self._record(found[:-1]), False


def _guarded(alias: str) -> _GuardedStatements:
    connection = connections[alias]
    kept = connection.__dict__.get("_bench_guarded")
    if kept is None:
        kept = connection.__dict__["_bench_guarded"] = _GuardedStatements(connection)
    return kept


class _ReadOnlyFirst(DatabaseStore):
    """Reads the key first, as the package did before issue #16: claims come later."""

    def get_or_claim(
        self, claim: ClaimRequest, *, lease: timedelta | None
    ) -> tuple[Record | None, bool]:
        return self.get(scope=claim.scope, key=claim.key), False


def key_lock_id(scope: str, key: str) -> int:
    """A signed 64-bit advisory lock id for (scope, key)."""
    digest = hashlib.blake2b(f"{scope}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class AdvisoryLockStore(_ReadOnlyFirst):
    """A first execution: SELECT; BEGIN; lock and read; the view; INSERT; COMMIT."""

    def __init__(self) -> None:
        self._held = threading.local()

    def _tokens(self) -> set[str]:
        tokens: set[str] | None = getattr(self._held, "tokens", None)
        if tokens is None:
            tokens = self._held.tokens = set()
        return tokens

    @contextmanager
    def lock(
        self, claim: ClaimRequest, *, insert: bool = True, claimed: bool = False
    ) -> Iterator[Record]:
        alias = self._alias()
        statements = _advisory(alias)
        with ExitStack() as transaction:
            with translate_errors(alias):
                transaction.enter_context(db_transaction.atomic(using=alias))
                with connections[alias].cursor() as cursor:
                    cursor.execute(statements.lock_and_read, statements.lock_params(claim))
                    got, *row = cursor.fetchone()
                if not got:
                    raise KeyLocked()
                record = None if row[1] is None else statements._record(tuple(row))
                if record is not None and record.completed and record.live:
                    yield record  # a replay after all: the lifecycle answers it
                    return
                self._tokens().add(claim.token)
                transaction.callback(self._tokens().discard, claim.token)
            yield owned_record(claim)

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        if claim.token not in self._tokens():
            return super().complete(claim, response)
        alias = self._alias()
        with translate_errors(alias):
            statements = _advisory(alias)
            with connections[alias].cursor() as cursor:
                params = statements.completed_params(claim, response)
                cursor.execute(statements.insert_completed, params)
        return True

    def release(self, claim: ClaimRequest) -> bool:
        if claim.token in self._tokens():
            return True  # nothing was written: the rollback took the lock with it
        return super().release(claim)


class _AdvisoryStatements(PostgresqlStatements):
    @cached_property
    def lock_and_read(self) -> str:
        return (
            f"SELECT pg_try_advisory_xact_lock(%s), {self._get_columns} FROM (VALUES (1)) AS one "
            f"LEFT JOIN {self._table} ON {self._where_key}"
        )

    def lock_params(self, claim: ClaimRequest) -> list[object]:
        return [key_lock_id(claim.scope, claim.key), claim.scope, claim.key]

    @cached_property
    def insert_completed(self) -> str:
        q, now, later = self._q, self.now, self.later()
        columns = (
            "scope", "key", "state", "fingerprint", "method", "path", "owner_token",
            "response_status", "response_headers", "response_body",
            "created_at", "completed_at", "expires_at",
        )  # fmt: skip
        names = ", ".join(q(name) for name in columns)
        updates = ", ".join(f"{q(name)} = EXCLUDED.{q(name)}" for name in columns[2:])
        return (
            f"INSERT INTO {self._table} ({names}) VALUES "
            f"(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, {now}, {now}, {later}) "
            f"ON CONFLICT ({q('scope')}, {q('key')}) DO UPDATE SET {updates}, "
            f"{q('lease_until')} = NULL, {q('recovery_points')} = NULL"
        )

    def completed_params(self, claim: ClaimRequest, response: StoredResponse) -> list[object]:
        headers = [list(header) for header in response.headers]
        return [
            claim.scope,
            claim.key,
            COMPLETED,
            claim.fingerprint,
            claim.method,
            claim.path,
            claim.token,
            response.status,
            _HEADERS.get_db_prep_save(headers, self.connection),
            _BODY.get_db_prep_save(response.body, self.connection),
            self.duration(claim.ttl),
        ]


def _advisory(alias: str) -> _AdvisoryStatements:
    connection = connections[alias]
    kept = connection.__dict__.get("_bench_advisory")
    if kept is None:
        kept = connection.__dict__["_bench_advisory"] = _AdvisoryStatements(connection)
    return kept


class InTransactionClaimStore(_ReadOnlyFirst):
    """A first execution: SELECT; BEGIN; INSERT the claim; the view; UPDATE; COMMIT."""

    @contextmanager
    def lock(
        self, claim: ClaimRequest, *, insert: bool = True, claimed: bool = False
    ) -> Iterator[Record]:
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
    statements = _advisory(alias)
    with connections[alias].cursor() as cursor:
        cursor.execute(statements._insert_claim, statements._insert_params(claim, None))
        return bool(cursor.rowcount == 1)
