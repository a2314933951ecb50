"""Where keys live: how a key is claimed, locked, completed and released.

A store knows nothing of HTTP. It keeps one record per (scope, key) and settles races between
requests for the same key; ``core`` decides what each record means for the request at hand.

- ``base``: the ``Store`` and ``PhasedStore`` protocols, ``KeyLocked``, ``may_take_over`` and
  the translation of database errors;
- ``database``: ``DatabaseStore``, and the replay cache in front of its statements;
- ``sql``: the statements ``DatabaseStore`` sends, one strategy per way of writing them;
- ``cache``: ``CacheStore``, in Redis.

Every name is importable from here, as ``django_idempotency.stores.DatabaseStore`` is the
setting's dotted path.
"""

from __future__ import annotations

from django_idempotency.records import (
    COMPLETED,
    IN_PROGRESS,
    ClaimRequest,
    Record,
    StoredResponse,
)
from django_idempotency.stores.base import (
    NOT_MIGRATED,
    KeyLocked,
    KeyVanished,
    PhasedStore,
    Store,
    is_missing_schema,
    may_take_over,
)
from django_idempotency.stores.cache import CacheStore
from django_idempotency.stores.database import DatabaseStore

__all__ = [
    "COMPLETED",
    "IN_PROGRESS",
    "NOT_MIGRATED",
    "CacheStore",
    "ClaimRequest",
    "DatabaseStore",
    "KeyLocked",
    "KeyVanished",
    "PhasedStore",
    "Record",
    "Store",
    "StoredResponse",
    "is_missing_schema",
    "may_take_over",
]
