"""The transactional outbox: events written with the writes they announce, and their relay.

:func:`add_event` writes an :class:`~django_idempotency.models.OutboxEvent` in the caller's
transaction, so the event exists if and only if the writes it announces committed. The relay
(:func:`relay_batch`, :func:`relay`; ``manage.py idempotency_outbox_relay`` and the Celery
task ``django_idempotency.celery.relay_outbox``) hands each pending event to the publisher
that ``IDEMPOTENCY_OUTBOX_PUBLISHERS`` names for its topic, and marks it published in the
same transaction that holds its row lock. A relay that dies between the two leaves the event
pending: it is published again, with the same message id, for the consumer to deduplicate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections, router, transaction
from django.db.models import F
from django.db.models.functions import Now
from django.db.transaction import TransactionManagementError
from django.utils.module_loading import import_string

from django_idempotency.checks import ensure_valid_settings
from django_idempotency.conf import MAX_BATCH_SIZE, conf, describe, validate_integer
from django_idempotency.models import ERROR_MESSAGE_LENGTH, OutboxEvent

__all__ = ["Publisher", "RelayResult", "add_event", "publisher_for", "relay", "relay_batch"]

logger = logging.getLogger("django_idempotency")

#: A publisher: called with the event, returns once the event is handed over (raises if not).
Publisher = Callable[[OutboxEvent], object]

#: The topic under which ``IDEMPOTENCY_OUTBOX_PUBLISHERS`` names the publisher of every topic
#: it does not list.
ANY_TOPIC = "*"
#: The longest topic (the column's size).
TOPIC_LENGTH = 255
#: After a failed attempt, the next one waits 2, 4, 8 ... seconds, at most this long.
MAX_RETRY_DELAY = timedelta(minutes=10)


def add_event(
    topic: str,
    payload: Any,
    *,
    headers: Mapping[str, str] | None = None,
    using: str | None = None,
) -> OutboxEvent:
    """Write an event to the outbox in the current transaction; the relay publishes it later.

    Call it inside the ``transaction.atomic()`` block (or the atomic view, phase or
    idempotent call) whose writes the event announces: the event commits with them, or rolls
    back with them. Outside a transaction it raises ``TransactionManagementError``, since the
    event and the writes could then commit one without the other.

    * ``topic``: a topic that ``IDEMPOTENCY_OUTBOX_PUBLISHERS`` lists (or ``"*"`` covers),
      else ``ImproperlyConfigured``: an event nobody publishes would wait for ever. With the
      Celery publisher, the topic is the name of the task to send;
    * ``payload``: anything ``DjangoJSONEncoder`` encodes, without NaN or infinities (else
      ``TypeError`` naming the topic); the publisher gets its JSON round trip (a ``Decimal``
      as a string);
    * ``headers``: optional string headers for the publisher (Celery message headers);
    * ``using``: the database of the writes; by default the router's choice for writing
      ``OutboxEvent``.

    The event's ``message_id`` (a UUID) is the same on every publication.
    """
    if (
        not isinstance(topic, str)
        or not 0 < len(topic) <= TOPIC_LENGTH
        or topic == ANY_TOPIC
        or "\x00" in topic
    ):
        raise ValueError(
            f"An outbox topic must be a string of 1 to {TOPIC_LENGTH} characters other than "
            f"{ANY_TOPIC!r}, without NUL characters, not {describe(topic)}."
        )
    ensure_valid_settings()  # a malformed IDEMPOTENCY_OUTBOX_PUBLISHERS, named
    _publisher_path(topic)  # ImproperlyConfigured when no publisher would take the event
    try:
        # Round-tripped, so the payload the publisher gets is the one stored.
        # allow_nan=False: NaN and Infinity are not JSON, and no database stores them as such.
        stored = json.loads(json.dumps(payload, cls=DjangoJSONEncoder, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"The payload of the outbox event {topic!r} must be JSON-serialisable: {exc}"
        ) from None
    if _holds_nul(stored):  # PostgreSQL's json types cannot hold one: a DataError at INSERT
        raise TypeError(
            f"The payload of the outbox event {topic!r} holds a NUL character (\\x00), which "
            "not every database can store."
        )
    if headers is None:
        headers = {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(name, str) and isinstance(value, str) and not _holds_nul([name, value])
        for name, value in headers.items()
    ):
        raise TypeError(
            f"The headers of the outbox event {topic!r} must map strings to strings without "
            f"NUL characters, not {describe(headers)}."
        )
    alias = using or router.db_for_write(OutboxEvent)
    if not connections[alias].in_atomic_block:
        raise TransactionManagementError(
            f"add_event({topic!r}) must be called inside transaction.atomic() on the database "
            f"{alias!r}, so that the event commits together with the writes it announces."
        )
    return OutboxEvent.objects.using(alias).create(
        topic=topic, payload=stored, headers=dict(headers)
    )


def _holds_nul(value: Any) -> bool:
    """Whether a JSON value holds ``"\\x00"`` in a string or a key."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


def _publisher_path(topic: str) -> str:
    publishers = conf.IDEMPOTENCY_OUTBOX_PUBLISHERS
    path = publishers.get(topic, publishers.get(ANY_TOPIC))
    if path is None:
        raise ImproperlyConfigured(
            f"IDEMPOTENCY_OUTBOX_PUBLISHERS names no publisher for the outbox topic {topic!r} "
            f"(nor one for every topic, {ANY_TOPIC!r})."
        )
    return path


def publisher_for(topic: str) -> Publisher:
    """The publisher of ``topic``: ``IDEMPOTENCY_OUTBOX_PUBLISHERS[topic]``, else its ``"*"``.

    Raises ``ImproperlyConfigured`` when there is none, or when its path does not import.
    """
    path = _publisher_path(topic)
    try:
        publisher: Publisher = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"IDEMPOTENCY_OUTBOX_PUBLISHERS names {path!r} for the topic {topic!r}, which "
            f"cannot be imported: {exc}"
        ) from None
    return publisher


@dataclass(frozen=True)
class RelayResult:
    """What a relay pass did: events published, and events whose publisher failed."""

    published: int = 0
    failed: int = 0

    def __add__(self, other: RelayResult) -> RelayResult:
        return RelayResult(self.published + other.published, self.failed + other.failed)


def _positive(name: str, value: object) -> int:
    try:
        return validate_integer(value, minimum=1)
    except ValueError as exc:
        raise ValueError(f"{name} {exc}") from None


def _batch_size(batch_size: int | None) -> int:
    value = conf.IDEMPOTENCY_OUTBOX_BATCH_SIZE if batch_size is None else batch_size
    try:
        return validate_integer(value, minimum=1, maximum=MAX_BATCH_SIZE)
    except ValueError as exc:
        raise ValueError(f"batch_size {exc}") from None


def relay_batch(*, batch_size: int | None = None, using: str | None = None) -> RelayResult:
    """Publish one batch of due events, oldest first, and mark them published.

    One transaction: up to ``batch_size`` (default ``IDEMPOTENCY_OUTBOX_BATCH_SIZE``) due
    events are locked (``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has it, so
    relays running at once take different events), each is handed to its publisher, and the
    published ones are marked, before the transaction commits. A process that dies before
    the commit leaves them all pending, to be published again with the same message ids.

    A publisher that raises fails only its own event: the attempt is counted, its error kept
    in ``last_error``, and the event waits 2, 4, 8 ... seconds (at most
    :data:`MAX_RETRY_DELAY`) before the next attempt. Each publisher runs in a savepoint,
    so a database error inside it leaves the batch's transaction usable.
    """
    ensure_valid_settings()  # before any event is marked failing for a malformed setting
    size = _batch_size(batch_size)
    alias = using or router.db_for_write(OutboxEvent)
    features = connections[alias].features
    with transaction.atomic(using=alias):
        due = OutboxEvent.objects.using(alias).due().order_by("available_at", "pk")
        if features.has_select_for_update_skip_locked:
            due = due.select_for_update(skip_locked=True)
        elif features.has_select_for_update:  # pragma: no cover - MySQL < 8, MariaDB < 10.6
            due = due.select_for_update()
        events = list(due[:size])
        published: list[int] = []
        failed = 0
        for event in events:
            try:
                with transaction.atomic(using=alias):
                    publisher_for(event.topic)(event)
            except Exception as exc:  # a broker's errors, whatever its transport raises
                logger.warning(
                    "Could not publish the outbox event %s (%s): %s",
                    event.message_id,
                    event.topic,
                    exc,
                    exc_info=True,
                )
                _record_failure(event, exc, alias)
                failed += 1
            else:
                published.append(event.pk)
        if published:
            OutboxEvent.objects.using(alias).filter(pk__in=published).update(
                published_at=Now(), attempts=F("attempts") + 1, last_error=""
            )
    return RelayResult(published=len(published), failed=failed)


def _record_failure(event: OutboxEvent, exc: Exception, alias: str) -> None:
    attempts = event.attempts + 1
    delay = min(timedelta(seconds=2 ** min(attempts, 20)), MAX_RETRY_DELAY)
    error = f"{type(exc).__name__}: {exc}"[:ERROR_MESSAGE_LENGTH]
    OutboxEvent.objects.using(alias).filter(pk=event.pk).update(
        attempts=attempts, last_error=error, available_at=Now() + delay
    )


def relay(
    *, batch_size: int | None = None, max_batches: int | None = None, using: str | None = None
) -> RelayResult:
    """Run :func:`relay_batch` until a batch comes back short (or ``max_batches`` ran).

    Each batch commits before the next starts, so stopping between batches loses nothing.
    Returns the totals.
    """
    size = _batch_size(batch_size)
    if max_batches is not None:
        _positive("max_batches", max_batches)
    total = RelayResult()
    batches = 0
    while max_batches is None or batches < max_batches:
        result = relay_batch(batch_size=size, using=using)
        total += result
        batches += 1
        if result.published + result.failed < size:
            break
    return total
