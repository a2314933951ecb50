"""Where keys live: how a key is claimed, locked, completed and released.

A store knows nothing of HTTP. It keeps one record per (scope, key) and settles races between
requests for the same key; ``core`` decides what each record means for the request at hand.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from datetime import timedelta
from typing import Any, Protocol

from django.core.exceptions import ImproperlyConfigured
from django.db import (
    InterfaceError,
    OperationalError,
    ProgrammingError,
    connections,
    router,
)
from django.db import transaction as db_transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.constants import OnConflict
from django.db.models.functions import Now
from django.db.models.sql.subqueries import InsertQuery
from django.utils.duration import duration_microseconds

from django_idempotency import replay_cache
from django_idempotency.exceptions import StoreUnavailable
from django_idempotency.models import IdempotencyKey
from django_idempotency.records import (
    COMPLETED,
    IN_PROGRESS,
    ClaimRequest,
    Record,
    StoredResponse,
    digest,
)

# The records are defined in ``records``; importing them from here keeps working.
__all__ = [
    "COMPLETED",
    "IN_PROGRESS",
    "CacheStore",
    "ClaimRequest",
    "DatabaseStore",
    "KeyLocked",
    "PhasedStore",
    "Record",
    "Store",
    "StoredResponse",
]

logger = logging.getLogger("django_idempotency")


class KeyLocked(Exception):
    """Another live request holds the key; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float = 1.0) -> None:
        super().__init__("The idempotency key is held by another request.")
        self.retry_after = retry_after


class Store(Protocol):
    """How ``core`` talks to a store. A project's own store needs no base class.

    The claim rule every store follows: insert the record if the key is absent; if it is
    present, replace it with the caller's when :func:`may_take_over` says so (expired, or
    unfinished and abandoned: its lease passed with the same fingerprint, or in the atomic
    mode its lock is free); otherwise leave it. The caller owns the key when the returned
    record carries its token. Failures to reach the store raise :class:`StoreUnavailable`;
    a key held by a live request may raise :class:`KeyLocked`.
    """

    #: Whether :meth:`lock` is available (the atomic mode).
    supports_atomic: bool

    def get(self, *, scope: str, key: str) -> Record | None:
        """The key's record, without locking it, or ``None``."""

    def claim(self, claim: ClaimRequest, *, lease: timedelta, insert: bool = True) -> Record:
        """Claim the key in the lease mode: a short write, fenced by ``claim.token``."""

    def lock(self, claim: ClaimRequest, *, insert: bool = True) -> AbstractContextManager[Record]:
        """Claim and lock the key for the atomic mode.

        The context is a transaction that stays open while the view runs; leaving it with an
        exception rolls back the view's writes together with the claim.
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
        self, claim: ClaimRequest, points: tuple[tuple[str, Any], ...]
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
def _translate_errors(alias: str | None = None) -> Iterator[None]:
    try:
        yield
    except (OperationalError, InterfaceError, ProgrammingError) as exc:
        if _lock_error(exc):
            raise KeyLocked() from exc
        if is_missing_schema(exc):
            # A deployment that forgot `migrate`: every covered request fails until it runs,
            # so say what to do in the log; the client gets the store-unavailable problem.
            logger.error(NOT_MIGRATED.format(alias=alias or router.db_for_write(IdempotencyKey)))
            raise StoreUnavailable(retry_after=1) from exc
        if isinstance(exc, ProgrammingError):
            raise  # a bug, not an outage: never hidden behind a 503
        raise StoreUnavailable(retry_after=1) from exc


class DatabaseStore:
    """Keys in the ``IdempotencyKey`` table, claimed by unique constraint and row locks.

    The database alias is the router's choice for writing ``IdempotencyKey``; a subclass may
    pin ``using``. Every deadline is compared with the database's own clock.
    """

    supports_atomic = True
    supports_phases = True
    using: str | None = None

    def _alias(self) -> str:
        return self.using or router.db_for_write(IdempotencyKey)

    def transaction_alias(self) -> str:
        """The database whose transactions commit a phase's writes with its recovery point."""
        return self._alias()

    def _rows(self, alias: str) -> Any:
        return IdempotencyKey.objects.using(alias).annotate(db_now=Now())

    def get(self, *, scope: str, key: str) -> Record | None:
        cached = replay_cache.lookup(scope, key)
        if cached is not None:
            return cached
        alias = self._alias()
        connection = connections[alias]
        with _translate_errors():  # the statements may need the server's version first
            sql = _Sql.of(connection)
            if sql is None:
                # (scope, key) is unique: no ORDER BY, unlike first().
                rows = self._rows(alias).filter(scope=scope, key=key).order_by()[:1]
                row = next(iter(rows), None)
                if row is None:
                    return None
                record, remaining = _record(row), row.expires_at - row.db_now
            else:
                with connection.cursor() as cursor:
                    cursor.execute(sql.get, [scope, key])
                    found = cursor.fetchone()
                if found is None:
                    return None
                record, remaining = sql.record(found)
        if record.completed and record.live and replay_cache.enabled():
            # A miss (the cache was restarted, or evicted the copy): refill it for the rest
            # of the key's life, so the next replay needs no query again.
            assert record.response is not None
            replay_cache.remember(scope, key, record.fingerprint, record.response, remaining)
        return record

    def claim(self, claim: ClaimRequest, *, lease: timedelta, insert: bool = True) -> Record:
        alias = self._alias()
        with _translate_errors():
            # A new key is claimed by one autocommitted insert; only an existing row needs
            # the short locking transaction that may take it over.
            if insert and self._insert(alias, claim, lease=lease):
                return _owned_record(claim)
            with db_transaction.atomic(using=alias):
                return self._take(alias, claim, lease=lease)

    @contextmanager
    def lock(self, claim: ClaimRequest, *, insert: bool = True) -> Iterator[Record]:
        alias = self._alias()
        # With row locks, the claim is committed before the transaction starts: a concurrent
        # duplicate then finds a committed row that it cannot lock (and answers at once)
        # instead of waiting on our uncommitted insert for as long as the view runs. A live
        # request always holds its row's lock, so a claimed row that can be locked belongs to
        # a request that died, and is taken over. SQLite has no row locks: there the claim is
        # inserted inside the transaction, and its database lock serialises writers.
        early = insert and connections[alias].features.has_select_for_update
        with ExitStack() as transaction:
            with _translate_errors():  # claiming; errors of the view itself pass untouched
                inserted = early and self._insert(alias, claim, lease=None)
                transaction.enter_context(db_transaction.atomic(using=alias))
                if inserted:  # ours, unless a duplicate took it over before we locked it
                    owned = self._lock_own(alias, claim)
                else:  # SQLite: the insert is inside the transaction, and then ours
                    owned = insert and not early and self._insert(alias, claim, lease=None)
                record = _owned_record(claim) if owned else self._take(alias, claim, lease=None)
            yield record

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        alias = self._alias()
        connection = connections[alias]
        headers = [list(header) for header in response.headers]
        with _translate_errors():
            sql = _Sql.of(connection)
            if sql is None:
                updated: int = self._owned(claim, alias).update(
                    state=COMPLETED,
                    response_status=response.status,
                    response_headers=headers,
                    response_body=response.body,
                    completed_at=Now(),
                    expires_at=Now() + claim.ttl,
                    locked_until=None,
                )
            else:
                params = [
                    COMPLETED,
                    response.status,
                    _HEADERS.get_db_prep_save(headers, connection),
                    _BODY.get_db_prep_save(response.body, connection),
                    sql.duration(claim.ttl),
                    *_owner(claim),
                ]
                with connection.cursor() as cursor:
                    cursor.execute(sql.complete, params)
                    updated = cursor.rowcount
        if updated == 1 and response.body is not None and replay_cache.enabled():
            # Only once the response is committed (in the atomic mode, with the view's writes).
            db_transaction.on_commit(
                lambda: replay_cache.remember(
                    claim.scope, claim.key, claim.fingerprint, response, claim.ttl
                ),
                using=alias,
            )
        return updated == 1

    def release(self, claim: ClaimRequest) -> bool:
        with _translate_errors():
            deleted: int = self._owned(claim).delete()[0]
        return deleted == 1

    def renew(self, claim: ClaimRequest, *, lease: timedelta) -> bool:
        with _translate_errors():
            updated: int = self._owned(claim).update(locked_until=Now() + lease)
        return updated == 1

    def save_recovery_points(
        self, claim: ClaimRequest, points: tuple[tuple[str, Any], ...]
    ) -> bool:
        with _translate_errors():
            updated: int = self._owned(claim).update(
                recovery_points=[[name, result] for name, result in points]
            )
        return updated == 1

    def end_lease(self, claim: ClaimRequest) -> bool:
        with _translate_errors():
            updated: int = self._owned(claim).update(
                locked_until=Now(), owner_token=uuid.uuid4().hex
            )
        return updated == 1

    def _owned(self, claim: ClaimRequest, alias: str | None = None) -> Any:
        # Fencing: every write after the claim names the owner token, so a request whose
        # claim was taken over can neither overwrite nor delete the new owner's record.
        return IdempotencyKey.objects.using(alias or self._alias()).filter(
            scope=claim.scope, key=claim.key, owner_token=claim.token, state=IN_PROGRESS
        )

    def _lock_own(self, alias: str, claim: ClaimRequest) -> bool:
        """Lock the claim we have just inserted; ``False`` if it is no longer ours.

        A duplicate may have locked and taken over our committed claim before we locked it:
        then :meth:`_take` reads what it left. Cheaper than :meth:`_take`: no model to load.
        """
        connection = connections[alias]
        sql = _Sql.of(connection)
        if sql is None:
            rows = self._owned(claim, alias).select_for_update(nowait=True).order_by()
            return bool(list(rows.values_list("pk", flat=True)[:1]))
        with connection.cursor() as cursor:
            cursor.execute(sql.lock_own, _owner(claim))
            return cursor.fetchone() is not None

    def _insert(self, alias: str, claim: ClaimRequest, *, lease: timedelta | None) -> bool:
        """``INSERT`` the claim unless the key exists; ``False`` if a row was there already."""
        connection = connections[alias]
        sql = _Sql.of(connection)
        if sql is not None:
            params = [
                claim.scope,
                claim.key,
                IN_PROGRESS,
                claim.fingerprint,
                claim.method,
                claim.path,
                claim.token,
                sql.duration(claim.ttl),
            ]
            statement = sql.insert
            if lease is not None:
                statement = sql.insert_leased
                params.append(sql.duration(lease))
            with _bounded_lock_wait(connection), connection.cursor() as cursor:
                cursor.execute(statement, params)
                return bool(cursor.rowcount == 1)
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
            locked_until=None if lease is None else Now() + lease,
        )
        query = InsertQuery(IdempotencyKey, on_conflict=OnConflict.IGNORE)
        fields = [f for f in IdempotencyKey._meta.concrete_fields if not f.primary_key]
        query.insert_values(fields, [row])
        [(insert, params)] = query.get_compiler(using=alias).as_sql()
        with _bounded_lock_wait(connection), connection.cursor() as cursor:
            cursor.execute(_no_wait_prefix(connection) + insert, params)
            inserted: bool = cursor.rowcount == 1
            return inserted

    def _take(self, alias: str, claim: ClaimRequest, *, lease: timedelta | None) -> Record:
        """Lock the key's row; take it over when it is expired or abandoned."""
        connection = connections[alias]
        rows = self._rows(alias).filter(scope=claim.scope, key=claim.key)
        if connection.features.has_select_for_update_nowait:
            rows = rows.select_for_update(nowait=True)
        row = next(iter(rows.order_by()[:1]), None)
        if row is None:
            # Deleted between our insert and our lock (a release or a purge): try again.
            raise KeyLocked(retry_after=0)
        record = _record(row)
        if row.owner_token != claim.token and may_take_over(record, claim):
            if record.completed:
                replay_cache.forget([(claim.scope, claim.key)])
            deadline = None if lease is None else Now() + lease
            # The same request taking over from its own dead attempt resumes after that
            # attempt's last committed phase; anything else starts afresh.
            resumed = (
                not record.completed and record.live and record.fingerprint == claim.fingerprint
            )
            points = _recovery_points(row.recovery_points) if resumed else ()
            IdempotencyKey.objects.using(alias).filter(pk=row.pk).update(
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
                locked_until=deadline,
                recovery_points=[list(point) for point in points] or None,
            )
            return _owned_record(claim, points)
        return record


_HEADERS = IdempotencyKey._meta.get_field("response_headers")
_BODY = IdempotencyKey._meta.get_field("response_body")


def _owner(claim: ClaimRequest) -> list[str]:
    """The parameters of a fenced statement's ``WHERE``: the key, its owner and its state."""
    return [claim.scope, claim.key, claim.token, IN_PROGRESS]


_SQL_ATTRIBUTE = "_django_idempotency_sql"


class _Sql:
    """The store's hot statements, written once per connection, for PostgreSQL and MySQL.

    Building them with the ORM costs more Python than the database spends running them. They
    say what the ORM's queries say: the same columns, the same database clock (Django's
    ``Now()``: ``STATEMENT_TIMESTAMP()``, ``CURRENT_TIMESTAMP(6)``), the same fencing on owner
    token and state, ``ON CONFLICT DO NOTHING`` / ``INSERT IGNORE``. JSON and binary values
    are adapted by the model's own fields. Other databases use the ORM.
    """

    @classmethod
    def of(cls, connection: BaseDatabaseWrapper) -> _Sql | None:
        """The statements for ``connection``, kept on it (one wrapper per alias and thread)."""
        try:
            sql: _Sql | None = connection.__dict__[_SQL_ATTRIBUTE]
        except KeyError:
            sql = cls(connection) if connection.vendor in ("postgresql", "mysql") else None
            connection.__dict__[_SQL_ATTRIBUTE] = sql
        return sql

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        opts = IdempotencyKey._meta
        column = {field.name: str(field.column) for field in opts.concrete_fields}

        def q(name: str) -> str:
            return connection.ops.quote_name(column[name])

        table = connection.ops.quote_name(opts.db_table)
        self.mysql = mysql = connection.vendor == "mysql"
        now = "CURRENT_TIMESTAMP(6)" if mysql else "STATEMENT_TIMESTAMP()"
        later = f"{now} + INTERVAL %s MICROSECOND" if mysql else f"{now} + %s"

        def seconds_until(column: str) -> str:
            if mysql:  # whole microseconds: a division would round to its own scale
                return f"TIMESTAMPDIFF(MICROSECOND, {now}, {q(column)})"
            return f"EXTRACT(EPOCH FROM {q(column)} - {now})"

        key = f"{q('scope')} = %s AND {q('key')} = %s"
        owned = f"{key} AND {q('owner_token')} = %s AND {q('state')} = %s"
        columns = ", ".join(
            q(name)
            for name in (
                "fingerprint",
                "state",
                "owner_token",
                "response_status",
                "response_headers",
                "response_body",
            )
        )
        self.get = (
            f"SELECT {columns}, {seconds_until('expires_at')}, {seconds_until('locked_until')} "
            f"FROM {table} WHERE {key}"
        )
        nowait = " NOWAIT" if connection.features.has_select_for_update_nowait else ""
        self.lock_own = f"SELECT 1 FROM {table} WHERE {owned} FOR UPDATE{nowait}"
        inserted = ", ".join(
            q(name)
            for name in (
                "scope",
                "key",
                "state",
                "fingerprint",
                "method",
                "path",
                "owner_token",
                "response_headers",
                "created_at",
                "expires_at",
                "locked_until",
            )
        )
        values = f"%s, %s, %s, %s, %s, %s, %s, '[]', {now}, {later}"
        if mysql:
            prefix = _no_wait_prefix(connection) + "INSERT IGNORE INTO"
            self.insert = f"{prefix} {table} ({inserted}) VALUES ({values}, NULL)"
            self.insert_leased = f"{prefix} {table} ({inserted}) VALUES ({values}, {later})"
        else:
            end = "ON CONFLICT DO NOTHING"
            self.insert = f"INSERT INTO {table} ({inserted}) VALUES ({values}, NULL) {end}"
            self.insert_leased = (
                f"INSERT INTO {table} ({inserted}) VALUES ({values}, {later}) {end}"
            )
        self.complete = (
            f"UPDATE {table} SET {q('state')} = %s, {q('response_status')} = %s, "
            f"{q('response_headers')} = %s, {q('response_body')} = %s, "
            f"{q('completed_at')} = {now}, {q('expires_at')} = {later}, "
            f"{q('locked_until')} = NULL WHERE {owned}"
        )

    def duration(self, value: timedelta) -> Any:
        """A duration as the ``+`` of :attr:`insert` and :attr:`complete` takes it."""
        return duration_microseconds(value) if self.mysql else value

    def record(self, row: tuple[Any, ...]) -> tuple[Record, timedelta]:
        """The :class:`Record` of a row of :attr:`get`, and the time left until it expires."""
        fingerprint, state, token, status, headers, body, expires_in, lease = row
        response = None
        if state == COMPLETED and status is not None:
            # JSON comes back as text: Django asks both drivers not to decode it.
            response = StoredResponse(
                status=status,
                headers=[(name, value) for name, value in json.loads(headers)],
                body=None if body is None else bytes(body),
            )
        unit = 1_000_000 if self.mysql else 1  # TIMESTAMPDIFF's microseconds, or seconds
        expires_in = float(expires_in) / unit
        lease_remaining = None
        if state == IN_PROGRESS and lease is not None:
            lease_remaining = float(lease) / unit
        record = Record(
            fingerprint=fingerprint,
            state=state,
            owner_token=token,
            response=response,
            live=expires_in > 0,
            lease_remaining=lease_remaining,
        )
        return record, timedelta(seconds=expires_in)


def _owned_record(claim: ClaimRequest, points: tuple[tuple[str, Any], ...] = ()) -> Record:
    return Record(
        fingerprint=claim.fingerprint,
        state=IN_PROGRESS,
        owner_token=claim.token,
        response=None,
        live=True,
        recovery_points=points,
    )


def _recovery_points(value: Any) -> tuple[tuple[str, Any], ...]:
    """A ``recovery_points`` column's ``[[name, result], ...]`` as pairs."""
    return tuple((str(name), result) for name, result in value or ())


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


def _record(row: IdempotencyKey) -> Record:
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
    if row.state == IN_PROGRESS and row.locked_until is not None:
        lease_remaining = (row.locked_until - now).total_seconds()
    return Record(
        fingerprint=row.fingerprint,
        state=row.state,
        owner_token=row.owner_token,
        response=response,
        live=row.expires_at > now,
        lease_remaining=lease_remaining,
    )


def _no_wait_prefix(connection: BaseDatabaseWrapper) -> str:
    # On MariaDB an INSERT that meets a duplicate takes a shared lock on it, so it would wait
    # (up to innodb_lock_wait_timeout, 50 s by default) while a live request holds the row.
    # Fail at once instead; core retries or answers 409.
    if connection.vendor == "mysql" and connection.mysql_is_mariadb:  # type: ignore[attr-defined]
        return "SET STATEMENT innodb_lock_wait_timeout=0 FOR "
    return ""


@contextmanager
def _bounded_lock_wait(connection: BaseDatabaseWrapper) -> Iterator[None]:
    """Inside a caller's transaction on PostgreSQL, don't wait on another's uncommitted claim.

    Outside one, our ``INSERT`` autocommits and only ever waits for an instant. Inside one
    (``ATOMIC_REQUESTS``), a duplicate's insert would wait for the whole of the other
    request's transaction; a lock timeout turns that into an error, in a savepoint so the
    caller's transaction survives it.
    """
    if connection.vendor != "postgresql" or not connection.in_atomic_block:
        yield
        return
    with db_transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('lock_timeout'), set_config('lock_timeout', '1ms', true)"
        )
        (previous, _) = cursor.fetchone()
        yield
        # Only reached when the insert succeeded: a failed one rolls back to the savepoint,
        # which undoes the setting too.
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", [previous])


# -- The cache store --------------------------------------------------------------------------

# A record is one Redis string: "<state>|<token>|<expires ms>|<lease deadline ms>|<payload>",
# where state is P (in progress) or C (completed), deadlines are on the Redis server's clock,
# and the payload is a line of JSON (fingerprint, request, response head) then the body. The
# scripts below run atomically on the server; every write after a claim checks the "P|<token>|"
# prefix, which is the fencing of the lease mode.

_LUA_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function ms(value) return string.format('%.0f', value) end
"""

#: The record and the server's clock.
_LUA_GET = _LUA_NOW + "return {redis.call('GET', KEYS[1]), ms(now)}"

#: Write a new claim if the record is absent (ARGV[1] empty) or still starts with ARGV[1].
#: Returns {1, false, now} when claimed, else {0, current record or false, now}.
_LUA_CLAIM = (
    _LUA_NOW
    + """
local current = redis.call('GET', KEYS[1])
if current then
    if ARGV[1] == '' or string.sub(current, 1, #ARGV[1]) ~= ARGV[1] then
        return {0, current, ms(now)}
    end
elseif ARGV[1] ~= '' then
    return {0, false, ms(now)}
end
local ttl, lease = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('SET', KEYS[1],
    'P|' .. ARGV[2] .. '|' .. ms(now + ttl) .. '|' .. ms(now + lease) .. '|' .. ARGV[5],
    'PX', math.max(ttl, lease))
return {1, false, ms(now)}
"""
)

#: Complete the caller's claim (ARGV[1] is its token): the response lives for the TTL.
_LUA_COMPLETE = (
    _LUA_NOW
    + """
local current = redis.call('GET', KEYS[1])
local owned = 'P|' .. ARGV[1] .. '|'
if not current or string.sub(current, 1, #owned) ~= owned then return 0 end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], 'C|' .. ARGV[1] .. '|' .. ms(now + ttl) .. '|0|' .. ARGV[3], 'PX', ttl)
return 1
"""
)

#: Delete the caller's unfinished claim.
_LUA_RELEASE = """
local current = redis.call('GET', KEYS[1])
local owned = 'P|' .. ARGV[1] .. '|'
if not current or string.sub(current, 1, #owned) ~= owned then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

#: Move the caller's lease deadline to now + ARGV[2] ms; the record lives at least that long.
_LUA_RENEW = (
    _LUA_NOW
    + """
local current = redis.call('GET', KEYS[1])
local owned = 'P|' .. ARGV[1] .. '|'
if not current or string.sub(current, 1, #owned) ~= owned then return 0 end
local expires, rest = string.match(current, '^P|[^|]*|(%d+)|%d+|()')
local lease = tonumber(ARGV[2])
redis.call('SET', KEYS[1],
    owned .. expires .. '|' .. ms(now + lease) .. '|' .. string.sub(current, rest),
    'PX', math.max(tonumber(expires) - now, lease))
return 1
"""
)


@contextmanager
def _redis_errors() -> Iterator[None]:
    from redis.exceptions import RedisError

    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(retry_after=1) from exc


class CacheStore:
    """Keys in Redis, through a django-redis cache: the lease mode only.

    The cache alias is ``IDEMPOTENCY_STORE_CACHE`` (``"default"`` unless set); a subclass may
    pin ``alias``. Claims, completions, releases and renewals are each one Lua script, atomic
    on the server, and every deadline is compared with the Redis server's clock. A record
    lives for the key's TTL, or for as long as its lease when that is longer.

    The stored response cannot commit together with the view's database writes: the view runs
    outside any transaction of the store, as in every lease mode.
    """

    supports_atomic = False
    supports_phases = False
    alias: str | None = None

    def _alias(self) -> str:
        from django_idempotency.conf import conf

        return self.alias or conf.IDEMPOTENCY_STORE_CACHE

    def _client(self) -> Any:
        from django.core.cache import caches

        cache: Any = caches[self._alias()]
        client = getattr(cache, "client", None)
        if client is None or not hasattr(client, "get_client"):
            raise ImproperlyConfigured(
                f"The cache {self._alias()!r} is not a django-redis cache; CacheStore needs one."
            )
        return cache, client.get_client(write=True)

    def _run(self, script: str, claim_scope: str, claim_key: str, *args: Any) -> Any:
        cache, client = self._client()
        redis_key = cache.make_key(f"django_idempotency:key:{digest([claim_scope, claim_key])}")
        with _redis_errors():
            return client.register_script(script)(keys=[redis_key], args=list(args))

    def get(self, *, scope: str, key: str) -> Record | None:
        value, now = self._run(_LUA_GET, scope, key)
        return None if value is None else _decode(value, int(now))

    def claim(self, claim: ClaimRequest, *, lease: timedelta, insert: bool = True) -> Record:
        payload = _encode_payload(claim, None)
        ttl_ms, lease_ms = _ms(claim.ttl), _ms(lease)
        expected = b""  # the record must be absent
        for _ in range(3):
            claimed, current, now = self._run(
                _LUA_CLAIM, claim.scope, claim.key, expected, claim.token, ttl_ms, lease_ms, payload
            )
            if claimed:
                return _owned_record(claim)
            if current is None:
                expected = b""  # gone since we read it (released): claim it as new
                continue
            record = _decode(current, int(now))
            if not may_take_over(record, claim):
                return record
            expected = current[: _header_length(current)]
        raise KeyLocked(retry_after=0)  # the record keeps changing: let core try again

    def lock(self, claim: ClaimRequest, *, insert: bool = True) -> AbstractContextManager[Record]:
        raise ImproperlyConfigured("CacheStore has no atomic mode; use atomic=False with it.")

    def complete(self, claim: ClaimRequest, response: StoredResponse) -> bool:
        payload = _encode_payload(claim, response)
        done = self._run(
            _LUA_COMPLETE, claim.scope, claim.key, claim.token, _ms(claim.ttl), payload
        )
        return bool(done)

    def release(self, claim: ClaimRequest) -> bool:
        return bool(self._run(_LUA_RELEASE, claim.scope, claim.key, claim.token))

    def renew(self, claim: ClaimRequest, *, lease: timedelta) -> bool:
        return bool(self._run(_LUA_RENEW, claim.scope, claim.key, claim.token, _ms(lease)))


def _ms(duration: timedelta) -> int:
    return max(int(duration.total_seconds() * 1000), 1)


def _encode_payload(claim: ClaimRequest, response: StoredResponse | None) -> bytes:
    head: dict[str, Any] = {"fingerprint": claim.fingerprint, "method": claim.method}
    head["path"] = claim.path
    if response is not None:
        head["status"] = response.status
        head["headers"] = response.headers
        head["stored"] = response.body is not None
    line = json.dumps(head, ensure_ascii=True).encode()
    body = b"" if response is None else response.body or b""
    return line + b"\n" + body


def _header_length(value: bytes) -> int:
    """The length of a record's "<state>|<token>|<expires>|<lease>|" header."""
    index = -1
    for _ in range(4):
        index = value.index(b"|", index + 1)
    return index + 1


def _decode(value: bytes, now: int) -> Record:
    state, token, expires, lease, payload = value.split(b"|", 4)
    line, _, body = payload.partition(b"\n")
    head = json.loads(line)
    completed = state == b"C"
    response = None
    if completed:
        response = StoredResponse(
            status=head["status"],
            headers=[(name, header) for name, header in head["headers"]],
            body=body if head["stored"] else None,
        )
    return Record(
        fingerprint=head["fingerprint"],
        state=COMPLETED if completed else IN_PROGRESS,
        owner_token=token.decode(),
        response=response,
        live=int(expires) > now,
        lease_remaining=None if completed else (int(lease) - now) / 1000,
    )
