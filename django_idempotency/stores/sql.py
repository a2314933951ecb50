"""The database store's statements, as strategies: the ORM, and plain SQL per database vendor.

:class:`Statements` is every statement :class:`~django_idempotency.stores.DatabaseStore`
sends. :class:`OrmStatements` writes each of them with the ORM and runs on every database.
:class:`PostgresqlStatements` and :class:`MysqlStatements` (MariaDB and MySQL) write the hot
ones (read, insert, lock, complete) by hand and inherit the rest: building those with the ORM
costs more Python than the database spends running them. Both say what the ORM's statements
say: the same columns, the same database clock (Django's ``Now()``: ``STATEMENT_TIMESTAMP()``,
``CURRENT_TIMESTAMP(6)``), the same fencing on owner token and state. The store's contract
suite and query budget run against each strategy on each database, so they cannot drift.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import cached_property
from typing import Any, Literal, NamedTuple, Protocol

from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, NotSupportedError, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.constants import OnConflict
from django.db.models.functions import Now
from django.db.models.sql.subqueries import InsertQuery
from django.utils.duration import duration_microseconds

from django_idempotency.models import IdempotencyKey
from django_idempotency.records import (
    COMPLETED,
    IN_PROGRESS,
    ClaimRequest,
    Record,
    StoredResponse,
    digest,
)

#: Which statements a store sends: ``"auto"``, the plain SQL written for the database's vendor
#: where there is some (PostgreSQL, MariaDB/MySQL) and the ORM elsewhere; ``"orm"``, the ORM.
StatementsKind = Literal["auto", "orm"]

#: Each committed phase as ``(name, result)``, or ``(name, result, compensation)`` (see
#: ``django_idempotency.phases.Point``).
RecoveryPoints = tuple[tuple[Any, ...], ...]


class Locked(NamedTuple):
    """A key's row, read under its row lock (where the database has row locks)."""

    record: Record
    pk: Any
    #: The recovery points its request committed.
    recovery_points: RecoveryPoints


class Statements(Protocol):
    """Every statement of the database store, on one connection (so one alias and thread).

    Each method is one statement (or, for ``insert`` inside a caller's transaction on
    PostgreSQL, one statement in a savepoint), so a strategy never changes what a request
    costs. Errors are the driver's: the store translates them.
    """

    alias: str

    def get(self, scope: str, key: str) -> Record | None:
        """The key's record, unlocked (its ``expires_in`` read on the database's clock)."""

    def insert(self, claim: ClaimRequest, *, lease: timedelta | None) -> bool:
        """Insert the claim unless the key exists; ``False`` if a row was there already."""

    def lock_own(self, claim: ClaimRequest) -> bool:
        """Lock the caller's unfinished claim; ``False`` if it is no longer the caller's."""

    def lock(self, scope: str, key: str) -> Locked | None:
        """The key's row, locked without waiting where the database can, or ``None``."""

    def take_over(
        self,
        locked: Locked,
        claim: ClaimRequest,
        *,
        lease: timedelta | None,
        points: RecoveryPoints,
    ) -> None:
        """Replace the locked row with the caller's fresh claim, keeping ``points``."""

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        """Store the response on the caller's unfinished claim; ``False`` if it is not theirs."""

    def release(self, claim: ClaimRequest) -> bool:
        """Delete the caller's unfinished claim."""

    def renew(self, claim: ClaimRequest, *, lease: timedelta) -> bool:
        """Move the caller's lease deadline to ``lease`` from now."""

    def save_recovery_points(self, claim: ClaimRequest, points: RecoveryPoints) -> bool:
        """Replace the recovery points of the caller's unfinished claim."""

    def end_lease(self, claim: ClaimRequest) -> bool:
        """End the caller's lease now and replace its owner token."""


class AdvisoryStatements(Statements, Protocol):
    """The statements of advisory claims (``DatabaseStore.claims``), where a vendor has them."""

    #: Whether the locks are the session's (released by :meth:`release_key_locks`) rather
    #: than the transaction's.
    session_key_locks: bool

    def try_key_locks(self, claim: ClaimRequest) -> tuple[bool | None, Record | None]:
        """Take the claim's two locks without waiting, then read the key."""

    def release_key_locks(self, claim: ClaimRequest) -> None:
        """Release the claim's locks where they outlive the transaction."""

    def insert_completed(
        self, claim: ClaimRequest, response: StoredResponse, *, commit: bool = False
    ) -> bool:
        """Insert the key's row, completed; ``False`` if a row for the key exists already."""


class OrmStatements:
    """Every statement written with the ORM: the strategy of SQLite, and of ``"orm"``."""

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = connection
        self.alias: str = connection.alias

    def get(self, scope: str, key: str) -> Record | None:
        # (scope, key) is unique: no ORDER BY, unlike first().
        row = next(iter(self._rows().filter(scope=scope, key=key).order_by()[:1]), None)
        return None if row is None else row_record(row)

    def insert(self, claim: ClaimRequest, *, lease: timedelta | None) -> bool:
        row = IdempotencyKey(
            scope=claim.scope,
            key=claim.key,
            state=IN_PROGRESS,
            fingerprint=claim.fingerprint,
            method=claim.method,
            path=claim.path,
            owner_token=claim.token,
            created_at=Now(),
            expires_at=Now() + claim.ttl,
            lease_until=None if lease is None else Now() + lease,
        )
        query = InsertQuery(IdempotencyKey, on_conflict=OnConflict.IGNORE)
        fields = [f for f in IdempotencyKey._meta.concrete_fields if not f.primary_key]
        query.insert_values(fields, [row])
        [(statement, params)] = query.get_compiler(using=self.alias).as_sql()
        return self._insert(no_wait_prefix(self.connection) + statement, params)

    def lock_own(self, claim: ClaimRequest) -> bool:
        rows = self._owned(claim).select_for_update(nowait=self._nowait).order_by()
        return bool(list(rows.values_list("pk", flat=True)[:1]))

    def lock(self, scope: str, key: str) -> Locked | None:
        rows = self._rows().filter(scope=scope, key=key)
        if self._nowait:  # else no row locks (SQLite): its database lock serialises writers
            rows = rows.select_for_update(nowait=True)
        row = next(iter(rows.order_by()[:1]), None)
        if row is None:
            return None
        return Locked(row_record(row), row.pk, _recovery_points(row.recovery_points))

    def take_over(
        self,
        locked: Locked,
        claim: ClaimRequest,
        *,
        lease: timedelta | None,
        points: RecoveryPoints,
    ) -> None:
        IdempotencyKey.objects.using(self.alias).filter(pk=locked.pk).update(
            state=IN_PROGRESS,
            fingerprint=claim.fingerprint,
            method=claim.method,
            path=claim.path,
            owner_token=claim.token,
            response_status=None,
            response_headers=[],
            response_body=None,
            created_at=Now(),
            completed_at=None,
            expires_at=Now() + claim.ttl,
            lease_until=None if lease is None else Now() + lease,
            recovery_points=[list(point) for point in points] or None,
        )

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        updated: int = self._owned(claim).update(
            state=COMPLETED,
            response_status=response.status,
            response_headers=[list(header) for header in response.headers],
            response_body=response.body,
            completed_at=Now(),
            expires_at=Now() + claim.ttl,
            lease_until=None,
        )
        return updated == 1

    def release(self, claim: ClaimRequest) -> bool:
        deleted: int = self._owned(claim).delete()[0]
        return deleted == 1

    def renew(self, claim: ClaimRequest, *, lease: timedelta) -> bool:
        updated: int = self._owned(claim).update(lease_until=Now() + lease)
        return updated == 1

    def save_recovery_points(self, claim: ClaimRequest, points: RecoveryPoints) -> bool:
        updated: int = self._owned(claim).update(recovery_points=[list(point) for point in points])
        return updated == 1

    def end_lease(self, claim: ClaimRequest) -> bool:
        updated: int = self._owned(claim).update(lease_until=Now(), owner_token=uuid.uuid4().hex)
        return updated == 1

    @cached_property
    def _nowait(self) -> bool:
        return bool(self.connection.features.has_select_for_update_nowait)

    def _rows(self) -> Any:
        return IdempotencyKey.objects.using(self.alias).annotate(db_now=Now())

    def _owned(self, claim: ClaimRequest) -> Any:
        # Fencing: every write after the claim names the owner token, so a request whose
        # claim was taken over can neither overwrite nor delete the new owner's record.
        return IdempotencyKey.objects.using(self.alias).filter(
            scope=claim.scope, key=claim.key, owner_token=claim.token, state=IN_PROGRESS
        )

    def _insert(self, statement: str, params: Any) -> bool:
        with bounded_lock_wait(self.connection), self.connection.cursor() as cursor:
            cursor.execute(statement, params)
            return bool(cursor.rowcount == 1)


class SqlStatements(OrmStatements):
    """The hot statements in plain SQL, written once per connection; the rest are the ORM's.

    A subclass per vendor gives the dialect: its clock, how a duration is added to it and how
    the time left until a deadline is read, and its insert that ignores a duplicate. JSON and
    binary values are adapted by the model's own fields. The texts are built on first use, so
    choosing the strategy never queries the server (MariaDB's version, say).
    """

    #: The database clock, as Django's ``Now()`` reads it.
    now: str
    #: How many units of :meth:`seconds_until` make a second.
    unit: float

    def later(self) -> str:
        """The clock plus a duration parameter (see :meth:`duration`)."""
        raise NotImplementedError

    def seconds_until(self, column: str) -> str:
        """The time from the clock until ``column``, in :attr:`unit`."""
        raise NotImplementedError

    def duration(self, value: timedelta) -> Any:
        """A duration as :meth:`later` takes it."""
        raise NotImplementedError

    def insert_ignoring_duplicates(self, table: str, columns: str, values: str) -> str:
        """An ``INSERT`` that does nothing when the key exists."""
        raise NotImplementedError

    def get(self, scope: str, key: str) -> Record | None:
        with self.connection.cursor() as cursor:
            cursor.execute(self._get, [scope, key])
            found = cursor.fetchone()
        return None if found is None else self._record(found)

    def insert(self, claim: ClaimRequest, *, lease: timedelta | None) -> bool:
        params = [*claim_values(claim, IN_PROGRESS), self.duration(claim.ttl)]
        if lease is None:
            return self._insert(self._insert_claim, params)
        return self._insert(self._insert_leased, [*params, self.duration(lease)])

    def lock_own(self, claim: ClaimRequest) -> bool:
        with self.connection.cursor() as cursor:
            cursor.execute(self._lock_own, _owner(claim))
            return cursor.fetchone() is not None

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        params = [
            COMPLETED,
            *self._response_values(response),
            self.duration(claim.ttl),
            *_owner(claim),
        ]
        with self.connection.cursor() as cursor:
            cursor.execute(self._complete, params)
            return bool(cursor.rowcount == 1)

    def _q(self, name: str) -> str:
        return str(self.connection.ops.quote_name(_COLUMNS[name]))

    @cached_property
    def _table(self) -> str:
        return str(self.connection.ops.quote_name(IdempotencyKey._meta.db_table))

    @cached_property
    def _where_key(self) -> str:
        return f"{self._q('scope')} = %s AND {self._q('key')} = %s"

    @cached_property
    def _where_owned(self) -> str:
        return f"{self._where_key} AND {self._q('owner_token')} = %s AND {self._q('state')} = %s"

    @cached_property
    def _get(self) -> str:
        names = ("fingerprint", "state", "owner_token")
        columns = ", ".join(self._q(name) for name in (*names, *_RESPONSE_COLUMNS))
        return (
            f"SELECT {columns}, {self.seconds_until(self._q('expires_at'))}, "
            f"{self.seconds_until(self._q('lease_until'))} "
            f"FROM {self._table} WHERE {self._where_key}"
        )

    @cached_property
    def _lock_own(self) -> str:
        nowait = " NOWAIT" if self._nowait else ""
        return f"SELECT 1 FROM {self._table} WHERE {self._where_owned} FOR UPDATE{nowait}"

    def _insert_statement(self, lease_until: str) -> str:
        columns = ", ".join(self._q(name) for name in _INSERTED_COLUMNS)
        now, later = self.now, self.later()
        values = f"%s, %s, %s, %s, %s, %s, %s, '[]', {now}, {later}, {lease_until}"
        return self.insert_ignoring_duplicates(self._table, columns, values)

    @cached_property
    def _insert_claim(self) -> str:
        return self._insert_statement("NULL")

    @cached_property
    def _insert_leased(self) -> str:
        return self._insert_statement(self.later())

    @cached_property
    def _complete(self) -> str:
        q, now = self._q, self.now
        return (
            f"UPDATE {self._table} SET {q('state')} = %s, {q('response_status')} = %s, "
            f"{q('response_headers')} = %s, {q('response_body')} = %s, "
            f"{q('completed_at')} = {now}, {q('expires_at')} = {self.later()}, "
            f"{q('lease_until')} = NULL WHERE {self._where_owned}"
        )

    def _completed_values(self, claim: ClaimRequest, response: StoredResponse) -> list[Any]:
        """The values of :attr:`_insert_completed_strictly` for ``claim``'s response."""
        return [
            *claim_values(claim, COMPLETED),
            *self._response_values(response),
            self.duration(claim.ttl),
        ]

    @cached_property
    def _insert_completed_strictly(self) -> str:
        """An advisory claim's completed row (``_COMPLETED_COLUMNS``); fails on a duplicate."""
        columns = ", ".join(self._q(name) for name in _COMPLETED_COLUMNS)
        now = self.now
        values = f"%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, {now}, {now}, {self.later()}"
        return f"INSERT INTO {self._table} ({columns}) VALUES ({values})"

    def _response_values(self, response: StoredResponse) -> list[Any]:
        """The values of ``_RESPONSE_COLUMNS`` for ``response``, as this database stores them."""
        headers = [list(header) for header in response.headers]
        return [
            response.status,
            _HEADERS.get_db_prep_save(headers, self.connection),
            _BODY.get_db_prep_save(response.body, self.connection),
        ]

    def _record(self, row: tuple[Any, ...]) -> Record:
        """The :class:`Record` of a row of :attr:`_get`."""
        fingerprint, state, token, status, headers, body, expires_in, lease = row
        response = None
        if state == COMPLETED and status is not None:
            # JSON comes back as text: Django asks both drivers not to decode it.
            response = StoredResponse(
                status=status,
                headers=[(name, value) for name, value in json.loads(headers)],
                body=None if body is None else bytes(body),
            )
        expires_in = float(expires_in) / self.unit
        lease_remaining = None
        if state == IN_PROGRESS and lease is not None:
            lease_remaining = float(lease) / self.unit
        return Record(
            fingerprint=fingerprint,
            state=state,
            owner_token=token,
            response=response,
            live=expires_in > 0,
            expires_in=expires_in,
            lease_remaining=lease_remaining,
        )


class PostgresqlStatements(SqlStatements):
    """PostgreSQL: ``STATEMENT_TIMESTAMP()``, intervals, ``ON CONFLICT DO NOTHING``."""

    now = "STATEMENT_TIMESTAMP()"
    unit = 1  # EXTRACT(EPOCH ...) gives seconds

    def later(self) -> str:
        return f"{self.now} + %s"

    def seconds_until(self, column: str) -> str:
        return f"EXTRACT(EPOCH FROM {column} - {self.now})"

    def duration(self, value: timedelta) -> Any:
        return value

    def insert_ignoring_duplicates(self, table: str, columns: str, values: str) -> str:
        return f"INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT DO NOTHING"

    # Advisory claims (DatabaseStore.claims): an absent key is claimed by transaction-level
    # advisory locks, and its row is only written, completed, when its response is stored.

    session_key_locks = False

    def release_key_locks(self, claim: ClaimRequest) -> None:
        """Nothing: transaction-level locks end with the transaction."""

    def try_key_locks(self, claim: ClaimRequest) -> tuple[bool | None, Record | None]:
        """Take the claim's two advisory transaction locks without waiting, then read the key.

        The first lock is on (scope, key, fingerprint), the second on (scope, key), in that
        order: ``None`` when the first is held (the same request is in flight), ``False`` when
        only the second is (a different request is: whoever holds the second holds the first
        for its own fingerprint), ``True`` when both are ours. The read is a statement of its
        own, sent in the same round trip, so that it sees a row committed by the request that
        held the locks until just before (a statement sees what was committed when it began).
        """
        params = [
            advisory_lock_id([claim.scope, claim.key, claim.fingerprint]),
            advisory_lock_id([claim.scope, claim.key]),
        ]
        with self.connection.cursor() as cursor:
            if _sends_several_statements(cursor):
                cursor.execute(
                    f"{self._try_key_locks}; {self._get}", [*params, claim.scope, claim.key]
                )
                (locked,) = cursor.fetchone()
                cursor.nextset()
                found = cursor.fetchone()
            else:
                cursor.execute(self._try_key_locks, params)
                (locked,) = cursor.fetchone()
                if not locked:
                    return locked, None
                cursor.execute(self._get, [claim.scope, claim.key])
                found = cursor.fetchone()
        return locked, None if found is None else self._record(found)

    def insert_completed(
        self, claim: ClaimRequest, response: StoredResponse, *, commit: bool = False
    ) -> bool:
        """Insert the key's row, completed; ``False`` if a row for the key exists already.

        With ``commit``, the transaction's ``COMMIT`` goes in the same round trip where the
        cursor can send both (:func:`_sends_several_statements`): the insert then fails on a
        duplicate instead of doing nothing, so that the ``COMMIT`` never runs after it.
        """
        params = self._completed_values(claim, response)
        with self.connection.cursor() as cursor:
            if commit and _sends_several_statements(cursor):
                try:
                    cursor.execute(f"{self._insert_completed_strictly}; COMMIT", params)
                except IntegrityError as exc:
                    # The key's own unique constraint only: a view's deferred constraint
                    # failing at the COMMIT is the view's error.
                    diagnostic = getattr(exc.__cause__, "diag", None)
                    if getattr(diagnostic, "constraint_name", None) == _KEY_CONSTRAINT:
                        return False
                    raise
                return True
            cursor.execute(self._insert_completed, params)
            return bool(cursor.rowcount == 1)

    _try_key_locks = (
        "SELECT CASE WHEN pg_try_advisory_xact_lock(%s) THEN pg_try_advisory_xact_lock(%s) END"
    )

    @cached_property
    def _insert_completed(self) -> str:
        return f"{self._insert_completed_strictly} ON CONFLICT DO NOTHING"


class MysqlStatements(SqlStatements):
    """MariaDB and MySQL: ``CURRENT_TIMESTAMP(6)``, microseconds, ``INSERT IGNORE``."""

    now = "CURRENT_TIMESTAMP(6)"
    unit = 1_000_000  # whole microseconds: a division in SQL would round to its own scale

    def later(self) -> str:
        return f"{self.now} + INTERVAL %s MICROSECOND"

    def seconds_until(self, column: str) -> str:
        return f"TIMESTAMPDIFF(MICROSECOND, {self.now}, {column})"

    def duration(self, value: timedelta) -> Any:
        return duration_microseconds(value)

    def insert_ignoring_duplicates(self, table: str, columns: str, values: str) -> str:
        prefix = no_wait_prefix(self.connection)
        return f"{prefix}INSERT IGNORE INTO {table} ({columns}) VALUES ({values})"

    # Advisory claims with GET_LOCK, whose locks belong to the session, not the transaction:
    # the store takes them only for a transaction of its own (no caller's around it), and
    # releases them right after it ends (release_key_locks).

    session_key_locks = True

    def try_key_locks(self, claim: ClaimRequest) -> tuple[bool | None, Record | None]:
        """:meth:`PostgresqlStatements.try_key_locks` with ``GET_LOCK``, and the read as a
        statement of its own after it (Django's mysqlclient sends one statement at a time).

        Raises :class:`KeyLocksRefused` where the server refuses ``GET_LOCK`` (a Galera
        cluster: ``WSREP_ON``).
        """
        with self.connection.cursor() as cursor:
            try:
                cursor.execute(self._try_key_locks, self._key_lock_names(claim))
            except NotSupportedError as exc:
                if _mysql_error_code(exc) == 1235:  # ER_NOT_SUPPORTED_YET
                    raise KeyLocksRefused() from exc
                raise
            (locked,) = cursor.fetchone()
            if not locked:
                return (None if locked is None else False), None
            # Begun after the locks were won, it sees a row committed just before
            # (Django's MySQL connections read committed rows, statement by statement).
            cursor.execute(self._get, [claim.scope, claim.key])
            found = cursor.fetchone()
        return True, None if found is None else self._record(found)

    def release_key_locks(self, claim: ClaimRequest) -> None:
        """Release the claim's locks, those of them the session holds."""
        with self.connection.cursor() as cursor:
            # The (scope, key) lock first: while only the other is held, a duplicate would
            # take the pair for a different request's (answered 422).
            cursor.execute(
                "DO RELEASE_LOCK(%s), RELEASE_LOCK(%s)", self._key_lock_names(claim)[::-1]
            )

    def insert_completed(
        self, claim: ClaimRequest, response: StoredResponse, *, commit: bool = False
    ) -> bool:
        """Insert the key's row, completed; ``False`` if a row for the key exists already.

        ``commit`` changes nothing: the ``COMMIT`` is Django's, as ever. The insert is
        strict (not ``INSERT IGNORE``, which would turn a bad value into a warning) and
        a duplicate's error is caught: on MariaDB/MySQL it does not end the transaction.
        """
        with self.connection.cursor() as cursor:
            try:
                cursor.execute(
                    self._insert_completed_strictly, self._completed_values(claim, response)
                )
            except IntegrityError as exc:
                if _mysql_error_code(exc) == 1062:  # ER_DUP_ENTRY
                    return False
                raise
        return True

    _try_key_locks = "SELECT IF(GET_LOCK(%s, 0), GET_LOCK(%s, 0), NULL)"

    def _key_lock_names(self, claim: ClaimRequest) -> list[str]:
        # GET_LOCK's names are the server's, shared by its databases: the database's name
        # is part of each lock's id.
        database = str(self.connection.settings_dict["NAME"])
        return [
            f"django_idempotency:{advisory_lock_id([database, *values])}"
            for values in (
                [claim.scope, claim.key, claim.fingerprint],
                [claim.scope, claim.key],
            )
        ]


class KeyLocksRefused(Exception):
    """The database refused the advisory claims' locks: the store claims with rows there."""


def _mysql_error_code(exc: Exception) -> int | None:
    """The MySQL error number of a Django database error raised by mysqlclient."""
    cause = exc.__cause__
    args = getattr(cause, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


#: The plain-SQL strategy of each vendor that has one; ``"auto"`` uses the ORM for the others.
SQL_STATEMENTS: dict[str, type[SqlStatements]] = {
    "postgresql": PostgresqlStatements,
    "mysql": MysqlStatements,
}

_ATTRIBUTE = "_django_idempotency_statements"


def statements_for(connection: BaseDatabaseWrapper, kind: StatementsKind) -> Statements:
    """The statements of ``kind`` on ``connection``, kept on it: one per alias and thread."""
    kept: dict[str, Statements] = connection.__dict__.setdefault(_ATTRIBUTE, {})
    statements = kept.get(kind)
    if statements is None:
        if kind == "auto":
            strategy: type[OrmStatements] = SQL_STATEMENTS.get(connection.vendor, OrmStatements)
        elif kind == "orm":
            strategy = OrmStatements
        else:
            raise ImproperlyConfigured(
                f"DatabaseStore.statements must be 'auto' or 'orm', not {kind!r}."
            )
        statements = kept[kind] = strategy(connection)
    return statements


def row_record(row: IdempotencyKey) -> Record:
    """The :class:`Record` of a row annotated with the database's clock as ``db_now``."""
    now = row.db_now  # type: ignore[attr-defined]
    response = None
    if row.state == COMPLETED and row.response_status is not None:
        body = row.response_body
        response = StoredResponse(
            status=row.response_status,
            headers=[(name, value) for name, value in row.response_headers],
            body=None if body is None else bytes(body),
        )
    lease_remaining = None
    if row.state == IN_PROGRESS and row.lease_until is not None:
        lease_remaining = (row.lease_until - now).total_seconds()
    return Record(
        fingerprint=row.fingerprint,
        state=row.state,
        owner_token=row.owner_token,
        response=response,
        live=row.expires_at > now,
        expires_in=(row.expires_at - now).total_seconds(),
        lease_remaining=lease_remaining,
    )


_HEADERS = IdempotencyKey._meta.get_field("response_headers")
_BODY = IdempotencyKey._meta.get_field("response_body")
_COLUMNS = {field.name: str(field.column) for field in IdempotencyKey._meta.concrete_fields}
_RESPONSE_COLUMNS = ("response_status", "response_headers", "response_body")
#: The unique constraint on (scope, key) (``models.IdempotencyKey``).
_KEY_CONSTRAINT = "idempotency_scope_key_uniq"
#: The columns of :func:`claim_values`, which every inserted row starts with.
_CLAIM_COLUMNS = ("scope", "key", "state", "fingerprint", "method", "path", "owner_token")
#: The columns of a plain-SQL insert, in the order of its values.
_INSERTED_COLUMNS = (
    *_CLAIM_COLUMNS,
    "response_headers",
    "created_at",
    "expires_at",
    "lease_until",
)
#: The columns of an advisory claim's completed row, in the order of its values.
_COMPLETED_COLUMNS = (
    *_CLAIM_COLUMNS,
    *_RESPONSE_COLUMNS,
    "created_at",
    "completed_at",
    "expires_at",
)


def claim_values(claim: ClaimRequest, state: str) -> list[str]:
    """The values of :data:`_CLAIM_COLUMNS` for a row of ``claim`` in ``state``."""
    return [
        claim.scope,
        claim.key,
        state,
        claim.fingerprint,
        claim.method,
        claim.path,
        claim.token,
    ]


def _sends_several_statements(cursor: Any) -> bool:
    """Whether ``cursor`` (Django's) sends a text of several statements in one round trip
    and reads each one's result (``nextset()``): psycopg 3's client-side binding, Django's
    default. Server-side binding (``"server_side_binding": True``) sends one statement at a
    time, and psycopg2 cannot read past the first result."""
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(getattr(cursor, "cursor", None), psycopg.ClientCursor)


def advisory_lock_id(values: list[str]) -> int:
    """A signed 64-bit PostgreSQL advisory lock id for ``values`` (a SHA-256 prefix).

    Two different keys share an id with a chance of about 2^-64 per pair: they would then
    exclude each other while both are in flight (one answered 409), never run twice.
    """
    return int.from_bytes(bytes.fromhex(digest(values)[:16]), "big", signed=True)


def _owner(claim: ClaimRequest) -> list[str]:
    """The parameters of a fenced statement's ``WHERE``: the key, its owner and its state."""
    return [claim.scope, claim.key, claim.token, IN_PROGRESS]


def _recovery_points(value: Any) -> RecoveryPoints:
    """A ``recovery_points`` column's ``[[name, result(, compensation)], ...]`` as tuples."""
    return tuple((str(point[0]), *point[1:]) for point in value or ())


def no_wait_prefix(connection: BaseDatabaseWrapper) -> str:
    """What makes an ``INSERT`` fail at once, rather than wait, when it meets a locked row.

    On MariaDB an INSERT that meets a duplicate takes a shared lock on it, so it would wait
    (up to innodb_lock_wait_timeout, 50 s by default) while a live request holds the row.
    Fail at once instead; core retries or answers 409.
    """
    if connection.vendor == "mysql" and connection.mysql_is_mariadb:  # type: ignore[attr-defined]
        return "SET STATEMENT innodb_lock_wait_timeout=0 FOR "
    return ""


@contextmanager
def bounded_lock_wait(connection: BaseDatabaseWrapper) -> Iterator[None]:
    """Inside a caller's transaction on PostgreSQL, don't wait on another's uncommitted claim.

    Outside one, our ``INSERT`` autocommits and only ever waits for an instant. Inside one
    (``ATOMIC_REQUESTS``), a duplicate's insert would wait for the whole of the other
    request's transaction; a lock timeout turns that into an error, in a savepoint so the
    caller's transaction survives it.
    """
    if connection.vendor != "postgresql" or not connection.in_atomic_block:
        yield
        return
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('lock_timeout'), set_config('lock_timeout', '1ms', true)"
        )
        (previous, _) = cursor.fetchone()
        yield
        # Only reached when the insert succeeded: a failed one rolls back to the savepoint,
        # which undoes the setting too.
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", [previous])
