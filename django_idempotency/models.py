"""The ``IdempotencyKey`` model: one row per (scope, key), holding the stored response;
``DeadLetter``, the Celery deliveries that failed past their retries; and ``OutboxEvent``, the
transactional outbox."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.db import OperationalError, connections, models, router, transaction
from django.db.models import Q
from django.db.models.deletion import Collector
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

from django_idempotency import records, replay_cache
from django_idempotency.conf import conf

try:  # Only re-driving a dead letter publishes a Celery task.
    from celery import current_app as celery_app
except ImportError:  # pragma: no cover - the minimal env, without the celery extra
    celery_app = None


class IdempotencyKeyQuerySet(models.QuerySet["IdempotencyKey"]):
    """Queries on keys. Every deadline is compared with the database's clock (``Now()``).

    ``purge()`` and ``release_stale()`` act on the keys of the queryset they are called on
    (``IdempotencyKey.objects`` for all of them, or a filtered queryset, as the admin's actions
    do), a batch of primary keys at a time, each batch in its own short transaction.
    """

    def expired(self) -> IdempotencyKeyQuerySet:
        """Keys whose TTL has passed, compared on the database clock."""
        return self.filter(expires_at__lte=Now())

    def live(self) -> IdempotencyKeyQuerySet:
        """Keys whose TTL has not passed yet, compared on the database clock."""
        return self.filter(expires_at__gt=Now())

    def stale(self, *, lease: timedelta | None = None) -> IdempotencyKeyQuerySet:
        """Unfinished keys whose request may have died: candidates for release.

        A lease-mode key is stale once its lease deadline has passed (a live request keeps
        renewing it). An atomic-mode key has no deadline: its live request holds its row lock
        instead. It is a candidate once it is older than ``lease`` (default
        ``IDEMPOTENCY_LEASE``); :meth:`release_stale` and ``purge(stale_leases=True)`` then
        skip it while a request holds its row lock.
        """
        return self.filter(self._stale_q(conf.IDEMPOTENCY_LEASE if lease is None else lease))

    def _releasable_q(self) -> Q:
        """Stale keys that may be deleted before their TTL: none with recovery points.

        A key with recovery points is a request abandoned mid-way (see :meth:`abandoned`):
        deleting it would make its retry run its committed phases again. It goes when its TTL
        passes, or by :meth:`complete_abandoned`.
        """
        return self._stale_q(conf.IDEMPOTENCY_LEASE) & Q(recovery_points__isnull=True)

    def _stale_q(self, lease: timedelta) -> Q:
        return Q(state=self.model.State.IN_PROGRESS) & (
            Q(lease_until__lte=Now()) | Q(lease_until__isnull=True, created_at__lte=Now() - lease)
        )

    def purgeable(
        self, *, older_than: timedelta | None = None, stale_leases: bool = False
    ) -> IdempotencyKeyQuerySet:
        """The keys that :meth:`purge` with these arguments would delete, if none were held.

        Expired keys (at least ``older_than`` ago), except unfinished keys whose lease is still
        running, whatever their TTL says; with ``stale_leases``, the :meth:`stale` keys too.
        """
        if older_than is not None and older_than < timedelta(0):
            raise ValueError(f"older_than must not be negative, not {older_than!r}.")
        cutoff = Now() - older_than if older_than else Now()
        expired = Q(expires_at__lte=cutoff) & (
            Q(state=self.model.State.COMPLETED)
            | Q(lease_until__isnull=True)
            | Q(lease_until__lte=Now())
        )
        if stale_leases:
            return self.filter(expired | self._releasable_q())
        return self.filter(expired)

    def purge(
        self,
        *,
        batch_size: int | None = None,
        older_than: timedelta | None = None,
        stale_leases: bool = False,
        using: str | None = None,
    ) -> int:
        """Delete the expired keys of this queryset in batches; return how many were deleted.

        See :meth:`purge_batches` for the arguments; this is that generator run to its end::

            IdempotencyKey.objects.purge()  # e.g. from a Celery beat task
        """
        return sum(
            self.purge_batches(
                batch_size=batch_size,
                older_than=older_than,
                stale_leases=stale_leases,
                using=using,
            )
        )

    def purge_batches(
        self,
        *,
        batch_size: int | None = None,
        older_than: timedelta | None = None,
        stale_leases: bool = False,
        using: str | None = None,
    ) -> Iterator[int]:
        """Delete expired keys one batch at a time, yielding the number deleted by each batch.

        Each batch selects up to ``batch_size`` primary keys (default
        ``IDEMPOTENCY_PURGE_BATCH_SIZE``) and deletes them in one short transaction, committed
        before the batch is yielded, so stopping between batches loses nothing. Rows that a
        live request holds are never deleted: rows locked by another transaction are skipped
        (``SKIP LOCKED``, where the database has it), and so are unfinished keys whose lease
        is still running, even past their TTL. Two purges running at once skip each other's
        batches.

        ``older_than`` keeps keys that expired less than that long ago. ``stale_leases`` also
        deletes the :meth:`stale` keys, expired or not, once the expired ones are done.
        ``using`` names the database; by default the keys' (:func:`keys_database`).
        Raises ``ValueError`` for a batch size below 1 or a negative ``older_than``.
        """
        alias = self._write_alias(using)
        batch_size = _batch_size(batch_size)
        expired = self.purgeable(older_than=older_than)
        yield from _delete_in_batches(expired, alias, batch_size, ("expires_at", "pk"))
        if stale_leases:
            yield from self._release_batches(alias, batch_size)

    def release_stale(self, *, batch_size: int | None = None, using: str | None = None) -> int:
        """Delete this queryset's :meth:`stale` keys that no live request holds; return the count.

        Releasing frees the key, as the core does when a view raises: the next request with
        that key runs the view. Keys abandoned mid-way, with recovery points, are kept for
        their retry to resume (see :meth:`abandoned`).
        """
        return sum(self._release_batches(self._write_alias(using), _batch_size(batch_size)))

    def _release_batches(self, alias: str, batch_size: int) -> Iterator[int]:
        stale = self.filter(self._releasable_q())
        features = connections[alias].features
        if features.has_select_for_update and not features.has_select_for_update_skip_locked:
            # Without SKIP LOCKED a held atomic-mode row cannot be told from an abandoned one.
            stale = stale.filter(lease_until__isnull=False)
        return _delete_in_batches(stale, alias, batch_size, ("pk",))

    def abandoned(self, *, lease: timedelta | None = None) -> IdempotencyKeyQuerySet:
        """:meth:`stale` keys whose request stopped mid-way, after committing phases.

        A retry with the key would resume after its last recovery point; these are the ones
        no retry has come for (yet). ``lease`` as for :meth:`stale`.
        """
        return self.stale(lease=lease).filter(recovery_points__isnull=False)

    def complete_abandoned(
        self,
        *,
        status: int = 500,
        ttl: timedelta | None = None,
        all_stale: bool = False,
        using: str | None = None,
    ) -> int:
        """Mark this queryset's :meth:`abandoned` keys finished, without a response; the count.

        For requests abandoned mid-way that an operator has settled by hand: a retry with the
        key then never runs or resumes the work, and gets ``409 idempotency_response_not_stored``
        (``IdempotencyResponseNotStored`` for a function) naming ``status`` as the original
        status. The key is kept for ``ttl`` (default ``IDEMPOTENCY_TTL``) from now. With
        ``all_stale``, every :meth:`stale` key, also those that stopped before any phase (a
        retry would otherwise run them afresh). Keys that a live request holds are left alone:
        leases still running, and on databases with ``SKIP LOCKED`` atomic-mode rows whose
        lock is held.
        """
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status code (100-599), not {status!r}.")
        alias = self._write_alias(using)
        ttl = conf.IDEMPOTENCY_TTL if ttl is None else ttl
        stale = (self.stale() if all_stale else self.abandoned()).using(alias).order_by()
        features = connections[alias].features
        with transaction.atomic(using=alias):
            if features.has_select_for_update_skip_locked:
                stale = stale.select_for_update(skip_locked=True)
            elif features.has_select_for_update:
                # Without SKIP LOCKED a held atomic-mode row cannot be told from an abandoned one.
                stale = stale.filter(lease_until__isnull=False).select_for_update()
            pks = list(stale.values_list("pk", flat=True))
            completed: int = (
                self.model.objects.using(alias)
                .filter(pk__in=pks, state=self.model.State.IN_PROGRESS)
                .update(
                    state=self.model.State.COMPLETED,
                    response_status=status,
                    response_headers=[],
                    response_body=None,
                    completed_at=Now(),
                    expires_at=Now() + ttl,
                    lease_until=None,
                )
            )
        return completed

    def _write_alias(self, using: str | None) -> str:
        """``using``, else the database this queryset was pinned to, else the keys' database
        (:func:`keys_database`)."""
        pinned: str | None = self._db  # type: ignore[attr-defined]
        return using or pinned or keys_database()


def keys_database() -> str:
    """The database alias of every read and write of keys that the protocol makes.

    ``IDEMPOTENCY_DATABASE`` when set, else the router's choice for *writing*
    ``IdempotencyKey`` (``"default"`` without routers). Never the router's read database: a
    replay or a claim read from a replica that lags would run a request twice. The admin's
    lists and other reports read through the router (``db_for_read``) as any model does.
    """
    alias: str | None = conf.IDEMPOTENCY_DATABASE
    return alias or router.db_for_write(IdempotencyKey)


def _batch_size(batch_size: int | None) -> int:
    size = conf.IDEMPOTENCY_PURGE_BATCH_SIZE if batch_size is None else batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {size!r}.")
    return size


def _delete_in_batches(
    candidates: IdempotencyKeyQuerySet, alias: str, batch_size: int, order: tuple[str, ...]
) -> Iterator[int]:
    """Delete ``candidates`` a batch at a time, walking them in ``order`` (ending with pk).

    Each batch starts after the last row of the previous one (keyset pagination), so it never
    scans again the index entries of rows already deleted, or skipped because they were held.
    """
    connection = connections[alias]
    candidates = candidates.using(alias).order_by()
    # On PostgreSQL a batch is one statement, unless deleting the rows takes more than a plain
    # DELETE (a project's delete signals, or rows of its models that cascade).
    one_statement = connection.vendor == "postgresql" and Collector(
        using=alias, origin=candidates
    ).can_fast_delete(candidates)
    after = Q()
    while True:
        attempt = 1
        while True:
            # A deadlock rolls back the whole transaction: retry only a batch that owns it.
            outermost = not connection.in_atomic_block
            try:
                selected, deleted, last = _delete_batch(
                    candidates.filter(after), alias, batch_size, order, one_statement
                )
                break
            except OperationalError as exc:
                if not (outermost and _deadlock(exc)) or attempt == _DEADLOCK_ATTEMPTS:
                    raise
                attempt += 1
        if selected:
            yield deleted
        if last is None or selected < batch_size:
            return
        after = _after(order, last)


#: How often a batch that a deadlock rolled back is tried again.
_DEADLOCK_ATTEMPTS = 5


def _deadlock(exc: OperationalError) -> bool:
    cause = exc.__cause__
    if getattr(cause, "sqlstate", None) in ("40P01", "40001"):  # PostgreSQL
        return True
    args: tuple[Any, ...] = getattr(cause, "args", ())
    return args[:1] == (1213,)  # MySQL/MariaDB ER_LOCK_DEADLOCK


def _delete_batch(
    candidates: IdempotencyKeyQuerySet,
    alias: str,
    batch_size: int,
    order: tuple[str, ...],
    one_statement: bool,
) -> tuple[int, int, tuple[Any, ...] | None]:
    """One batch, in one transaction: how many rows it selected, deleted, and the last one.

    With a replay cache, the cached copies of the deleted keys are removed once the batch has
    committed, so a deleted key is never replayed from the cache.
    """
    keys: list[tuple[str, str]] | None = [] if replay_cache.enabled() else None
    selected, deleted, last = _delete_batch_rows(
        candidates, alias, batch_size, order, one_statement, keys
    )
    if keys:
        transaction.on_commit(lambda: replay_cache.forget(keys), using=alias)
    return selected, deleted, last


def _delete_batch_rows(
    candidates: IdempotencyKeyQuerySet,
    alias: str,
    batch_size: int,
    order: tuple[str, ...],
    one_statement: bool,
    keys: list[tuple[str, str]] | None,
) -> tuple[int, int, tuple[Any, ...] | None]:
    """:func:`_delete_batch`'s transaction; appends (scope, key) of the rows to ``keys``."""
    connection = connections[alias]
    skip_locked = connection.features.has_select_for_update_skip_locked
    outermost = not connection.in_atomic_block
    with transaction.atomic(using=alias):
        rows = candidates.order_by(*order)
        if skip_locked:
            rows = rows.select_for_update(skip_locked=True)
        rows = rows[:batch_size]
        if one_statement:
            selected, last = _delete_batch_postgresql(
                connection, rows, order, synchronous=not outermost, keys=keys
            )
            return selected, selected, last
        extra = () if keys is None else ("scope", "key")
        found = list(rows.values_list(*order, *extra))
        if not found:
            return 0, 0, None
        if keys is not None:
            keys.extend((row[-2], row[-1]) for row in found)
            found = [row[: len(order)] for row in found]
        # Where the database has row locks the rows are ours until the commit: delete them by
        # primary key alone (with the conditions again, MariaDB may range-scan, and lock, the
        # rows of a concurrent purge). Without row locks (SQLite) the statement that deletes
        # checks the conditions again.
        target = rows.model._base_manager.using(alias) if skip_locked else candidates
        deleted: int = target.filter(pk__in=[row[-1] for row in found]).delete()[0]
        return len(found), deleted, found[-1]


def _delete_batch_postgresql(
    connection: Any,
    rows: IdempotencyKeyQuerySet,
    order: tuple[str, ...],
    *,
    synchronous: bool,
    keys: list[tuple[str, str]] | None,
) -> tuple[int, tuple[Any, ...] | None]:
    """Lock and delete the batch ``rows`` selects in one statement; return its size and last row.

    Sending a thousand primary keys back to the server costs more than deleting the rows. The
    batch's commit need not wait for the disk (``synchronous_commit``): after a crash that
    loses it, the keys are still expired and the next purge deletes them. Not so when the
    batch runs inside a caller's transaction, whose own writes must stay durable.
    """
    opts = rows.model._meta
    quote = connection.ops.quote_name
    columns = [quote(_column(opts, name)) for name in order]
    select, params = rows.values("pk").query.get_compiler(connection=connection).as_sql()
    table, pk = quote(opts.db_table), quote(opts.pk.column)
    returned = ", ".join(columns)
    descending = ", ".join(f"{column} DESC" for column in columns)
    sql = (
        f"WITH batch AS ({select}), "
        f"deleted AS (DELETE FROM {table} WHERE {pk} IN (SELECT * FROM batch) "
        f"RETURNING {returned}, {quote('scope')}, {quote('key')}) "
    )
    if keys is None:
        sql += f"SELECT count(*) OVER (), {returned} FROM deleted ORDER BY {descending} LIMIT 1"
    else:  # every deleted key, for the replay cache; the last row first
        sql += f"SELECT 0, {returned}, {quote('scope')}, {quote('key')} FROM deleted"
        sql += f" ORDER BY {descending}"
    with connection.cursor() as cursor:
        if not synchronous:  # in a caller's transaction, it would apply to the caller's writes
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
        cursor.execute(sql, params)
        if keys is not None:
            found = cursor.fetchall()
            keys.extend((found_row[-2], found_row[-1]) for found_row in found)
            if not found:
                return 0, None
            return len(found), tuple(found[0][1 : 1 + len(order)])
        row = cursor.fetchone()
    if row is None:
        return 0, None
    return row[0], tuple(row[1:])


def _column(opts: Any, name: str) -> str:
    column: str = opts.pk.column if name == "pk" else opts.get_field(name).column
    return column


def _after(order: tuple[str, ...], last: tuple[Any, ...]) -> Q:
    """Rows after ``last`` in ``order``: ``(a, pk) > (x, y)``, with a bound an index can use."""
    if len(order) == 1:
        return Q(**{f"{order[0]}__gt": last[0]})
    (column, _), (value, pk) = order, last
    return Q(**{f"{column}__gte": value}) & (
        Q(**{f"{column}__gt": value}) | Q(**{column: value, "pk__gt": pk})
    )


class ExactCharField(models.CharField):  # type: ignore[type-arg]
    """A ``CharField`` compared byte for byte on every database.

    MySQL's and MariaDB's default collations ignore case and trailing spaces, so ``ABC``,
    ``abc`` and ``"abc "`` would be one key there. They get a binary, no-pad collation;
    PostgreSQL and SQLite compare exactly already.
    """

    def db_parameters(self, connection: Any) -> dict[str, Any]:
        parameters: dict[str, Any] = super().db_parameters(connection)
        if connection.vendor == "mysql":
            mariadb = getattr(connection, "mysql_is_mariadb", False)
            parameters["collation"] = "utf8mb4_nopad_bin" if mariadb else "utf8mb4_0900_bin"
        return parameters


class IdempotencyKey(models.Model):
    """An idempotency key and, once its request has finished, the response to replay."""

    class State(models.TextChoices):
        IN_PROGRESS = records.IN_PROGRESS, _("in progress")
        COMPLETED = records.COMPLETED, _("completed")

    scope = ExactCharField(_("scope"), max_length=255)
    key = ExactCharField(_("key"), max_length=255)
    state = models.CharField(
        _("state"), max_length=16, choices=State.choices, default=State.IN_PROGRESS
    )
    fingerprint = models.CharField(_("request fingerprint"), max_length=64)
    method = models.CharField(_("method"), max_length=16)
    path = models.CharField(_("path"), max_length=2048)
    owner_token = models.CharField(_("owner token"), max_length=32)
    response_status = models.PositiveSmallIntegerField(_("response status"), null=True)
    response_headers = models.JSONField(_("response headers"), default=list)
    response_body = models.BinaryField(
        _("response body"),
        null=True,
        help_text=_("Empty (NULL) when the response was streamed or too large to store."),
    )
    created_at = models.DateTimeField(_("created at"), db_default=Now())
    completed_at = models.DateTimeField(_("completed at"), null=True)
    expires_at = models.DateTimeField(_("expires at"))
    # The column keeps the field's first name, so renaming the field (to the "lease" the docs
    # and settings say) changed no table.
    lease_until = models.DateTimeField(
        _("lease deadline"),
        null=True,
        db_column="locked_until",
        help_text=_(
            "Set in lease mode only: when an unfinished request's claim may be taken over."
        ),
    )
    recovery_points = models.JSONField(
        _("recovery points"),
        null=True,
        blank=True,
        help_text=_(
            "The phases an unfinished request has committed, in order, each with its result: "
            "a retry after a crash resumes after the last one."
        ),
    )

    objects = IdempotencyKeyQuerySet.as_manager()

    class Meta:
        verbose_name = _("idempotency key")
        verbose_name_plural = _("idempotency keys")
        constraints = [
            models.UniqueConstraint(fields=["scope", "key"], name="idempotency_scope_key_uniq"),
        ]
        # Named, so that a change of Django's naming rule never changes the migration. What
        # each one serves is in docs/purge.md and docs/admin.md.
        indexes = [
            # The purge walks expired keys in (expires_at, id) order; the expiry filter.
            models.Index(fields=["expires_at", "id"], name="idempotency_expires_idx"),
            # The admin's list, newest first, and its date hierarchy.
            models.Index(fields=["created_at", "id"], name="idempotency_created_idx"),
            # Unfinished keys and their leases: the release of stale keys, the state filter.
            models.Index(fields=["state", "lease_until"], name="idempotency_state_lease_idx"),
            # The admin's search by key, across scopes (the unique constraint leads with scope).
            models.Index(fields=["key"], name="idempotency_key_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.scope})"

    @property
    def recovery_point(self) -> str:
        """The name of the last phase committed, or ``""``."""
        points = self.recovery_points or []
        return str(points[-1][0]) if points else ""


#: The characters of a failed task's error message that a dead letter keeps.
ERROR_MESSAGE_LENGTH = 2000


class DeadLetterAlreadyRedriven(Exception):
    """The dead letter was re-driven already (or does not exist): it is not published again."""


class DeadLetterQuerySet(models.QuerySet["DeadLetter"]):
    """Dead letters: one per (scope, key), recorded by ``@idempotent_task``."""

    def pending(self) -> DeadLetterQuerySet:
        """Letters not re-driven since their task last failed."""
        return self.filter(redriven_at__isnull=True)

    def record(
        self,
        *,
        scope: str,
        key: str,
        task_name: str,
        task_id: str,
        arguments: Any,
        error: BaseException,
    ) -> DeadLetter:
        """Record a delivery that failed past its retries: one row per key, the last failure.

        A key that fails again (after a re-drive, say) updates its row and may be re-driven
        again.
        """
        letter, _created = self.update_or_create(
            scope=scope,
            key=key,
            defaults={
                "task_name": task_name,
                "task_id": task_id,
                "arguments": arguments,
                "error_type": _error_type(error)[:255],
                "error_message": str(error)[:ERROR_MESSAGE_LENGTH],
                "redriven_at": None,
            },
        )
        return letter

    def redrive(self, pk: Any) -> DeadLetter:
        """Publish the letter's task again, once: same task id, same arguments, so same key.

        ``redriven_at`` is set by one conditional ``UPDATE`` before publishing, so of two
        re-drives of one letter (two operators, a double click) only one publishes; the
        other raises :class:`DeadLetterAlreadyRedriven`, as does an unknown ``pk``. The key
        was freed when the task failed, so the re-driven delivery runs the task.
        """
        alias = router.db_for_write(self.model)
        with transaction.atomic(using=alias):
            marked = self.using(alias).pending().filter(pk=pk).update(redriven_at=Now())
            if not marked:
                raise DeadLetterAlreadyRedriven(
                    f"Dead letter {pk!r} does not exist or was re-driven already."
                )
            letter = self.using(alias).get(pk=pk)
            # Published last: if publishing fails, the letter stays pending.
            letter.publish()
        return letter


def _error_type(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


class DeadLetter(models.Model):
    """A Celery task delivery that failed after its last retry, kept for an operator."""

    scope = ExactCharField(_("scope"), max_length=255)
    key = ExactCharField(_("key"), max_length=255)
    task_name = models.CharField(_("task name"), max_length=255)
    task_id = models.CharField(_("task id"), max_length=255)
    arguments = models.JSONField(
        _("arguments"),
        encoder=DjangoJSONEncoder,
        help_text=_("The task's positional and keyword arguments: [args, kwargs]."),
    )
    error_type = models.CharField(_("error type"), max_length=255)
    error_message = models.TextField(_("error message"), blank=True)
    created_at = models.DateTimeField(_("created at"), db_default=Now())
    redriven_at = models.DateTimeField(_("re-driven at"), null=True, blank=True)

    objects = DeadLetterQuerySet.as_manager()

    class Meta:
        verbose_name = _("dead letter")
        verbose_name_plural = _("dead letters")
        constraints = [
            models.UniqueConstraint(
                fields=["scope", "key"], name="idempotency_deadletter_scope_key_uniq"
            ),
        ]
        indexes = [
            # The admin's list and the command, newest first.
            models.Index(fields=["created_at", "id"], name="idempotency_dl_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name} {self.key}"

    def publish(self) -> None:
        """Send the task again with the letter's task id and arguments (no re-drive check)."""
        if celery_app is None:  # pragma: no cover - the minimal env, without the celery extra
            raise ImproperlyConfigured(
                "Re-driving a dead letter needs Celery (pip install celery)."
            )
        args, kwargs = self.arguments
        task = celery_app.tasks.get(self.task_name)
        if task is None:
            celery_app.send_task(self.task_name, args, kwargs, task_id=self.task_id)
        else:
            task.apply_async(args, kwargs, task_id=self.task_id)


class OutboxEventQuerySet(models.QuerySet["OutboxEvent"]):
    """Outbox events: written with the writes they announce, published by the relay."""

    def pending(self) -> OutboxEventQuerySet:
        """Events not published yet, failing ones included."""
        return self.filter(published_at__isnull=True)

    def due(self) -> OutboxEventQuerySet:
        """Pending events whose next attempt is due, compared on the database clock."""
        return self.pending().filter(available_at__lte=Now())

    def failing(self) -> OutboxEventQuerySet:
        """Pending events whose last attempt to publish them failed."""
        return self.pending().exclude(last_error="")

    def published(self) -> OutboxEventQuerySet:
        return self.filter(published_at__isnull=False)

    def purge_published(
        self,
        *,
        older_than: timedelta,
        batch_size: int | None = None,
        using: str | None = None,
    ) -> int:
        """Delete events published at least ``older_than`` ago, in batches; return the count.

        Pending events are never deleted. Each batch (``batch_size`` rows, default
        ``IDEMPOTENCY_PURGE_BATCH_SIZE``) is one short transaction. Raises ``ValueError`` for
        a negative ``older_than`` or a batch size below 1.
        """
        if not isinstance(older_than, timedelta) or older_than < timedelta(0):
            raise ValueError(f"older_than must be a timedelta of zero or more, not {older_than!r}.")
        size = _batch_size(batch_size)
        pinned: str | None = self._db  # type: ignore[attr-defined]
        alias = using or pinned or router.db_for_write(self.model)
        old = self.using(alias).filter(published_at__lte=Now() - older_than)
        skip_locked = connections[alias].features.has_select_for_update_skip_locked
        deleted = 0
        while True:
            with transaction.atomic(using=alias):
                batch = old.order_by("published_at", "available_at", "pk")  # the index
                if skip_locked:
                    batch = batch.select_for_update(skip_locked=True)
                pks = list(batch.values_list("pk", flat=True)[:size])
                if pks:
                    deleted += self.model._base_manager.using(alias).filter(pk__in=pks).delete()[0]
            if len(pks) < size:
                return deleted


class OutboxEvent(models.Model):
    """An event written in the transaction of the writes it announces, until it is published.

    The relay (``manage.py idempotency_outbox_relay``) publishes it at least once, always with
    its ``message_id``, so that an idempotent consumer has its effect once.
    """

    message_id = models.UUIDField(
        _("message id"),
        default=uuid.uuid4,
        editable=False,
        help_text=_("The same on every publication of the event: consumers deduplicate on it."),
    )
    topic = models.CharField(_("topic"), max_length=255)
    payload = models.JSONField(_("payload"), encoder=DjangoJSONEncoder)
    headers = models.JSONField(_("headers"), default=dict, blank=True)
    created_at = models.DateTimeField(_("created at"), db_default=Now())
    available_at = models.DateTimeField(
        _("next attempt at"),
        db_default=Now(),
        help_text=_("The relay leaves the event alone until then (after a failed attempt)."),
    )
    attempts = models.PositiveIntegerField(
        _("attempts"),
        default=0,
        help_text=_("Attempts to publish the event that ended, published or failed."),
    )
    last_error = models.TextField(_("last error"), blank=True)
    published_at = models.DateTimeField(_("published at"), null=True, blank=True)

    objects = OutboxEventQuerySet.as_manager()

    class Meta:
        verbose_name = _("outbox event")
        verbose_name_plural = _("outbox events")
        constraints = [
            models.UniqueConstraint(fields=["message_id"], name="idempotency_outbox_message_uniq"),
        ]
        indexes = [
            # The relay's pending events, due first (published_at IS NULL, then the due
            # ones in order), and the purge of old published events (a range of
            # published_at).
            models.Index(
                fields=["published_at", "available_at", "id"], name="idempotency_outbox_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.topic} {self.message_id}"
