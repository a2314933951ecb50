"""The replay cache: completed responses also kept in a Django cache (``IDEMPOTENCY_REPLAY_CACHE``).

The database store stays the record of truth. A completed response is copied into the cache
once its transaction has committed, for no longer than the key's TTL, so a replay is answered
from the cache without a database query; a miss falls back to the database. The cache only
ever holds completed keys, which never change until they expire; taking an expired key over,
purging keys and deleting them through the ORM's purge remove their copies too.

The cache is an accelerator, never a dependency: when it cannot be reached, each operation
logs a warning and the database answers instead.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterable
from datetime import timedelta

from django.core.cache import BaseCache, caches

from django_idempotency.conf import conf
from django_idempotency.records import COMPLETED, Record, StoredResponse, digest

logger = logging.getLogger("django_idempotency")

#: Bumped whenever the layout of a cached entry changes, so old entries are never misread.
#: 2: the key's expiry was added.
VERSION = 2
PREFIX = "django_idempotency:replay:"


def enabled() -> bool:
    return conf.IDEMPOTENCY_REPLAY_CACHE is not None


def cache_key(scope: str, key: str) -> str:
    """The cache key of (scope, key): a digest, so any scope and key fit any cache backend."""
    return PREFIX + digest([scope, key])


def _cache() -> BaseCache | None:
    alias = conf.IDEMPOTENCY_REPLAY_CACHE
    return None if alias is None else caches[alias]


def lookup(scope: str, key: str) -> Record | None:
    """The completed record cached for (scope, key), or ``None`` (a miss, or no cache)."""
    cache = _cache()
    if cache is None:
        return None
    try:
        entry = cache.get(cache_key(scope, key))
    except Exception:
        logger.warning("The replay cache could not be read; answering from the store.")
        return None
    # A list or a tuple: msgpack and JSON serializers give back lists.
    if not isinstance(entry, (list, tuple)) or len(entry) != 6 or entry[0] != VERSION:
        return None
    _, fingerprint, status, headers, body, expires_at = entry
    try:
        content = base64.b64decode(body, validate=True)
        expires_in = float(expires_at) - time.time()
    except (TypeError, ValueError):
        return None
    if expires_in <= 0:
        return None  # past its key's expiry (another server's clock ahead): ask the store
    return Record(
        fingerprint=fingerprint,
        state=COMPLETED,
        owner_token="",
        response=StoredResponse(
            status=status, headers=[(name, value) for name, value in headers], body=content
        ),
        live=True,
        expires_in=expires_in,
    )


def remember(
    scope: str, key: str, fingerprint: str, response: StoredResponse, ttl: timedelta
) -> None:
    """Cache a completed response for at most ``ttl``, the time left until the key expires:
    it must never outlive the key itself. The expiry is kept with it (on this server's
    clock), for the replay's ``Idempotency-Key-Expires``."""
    cache = _cache()
    if cache is None:
        return
    if response.body is None or ttl <= timedelta(0):
        return
    # Plain types only (the body in base64), so that every cache serializer can store it:
    # django-redis's default pickle, and its JSON and msgpack serializers.
    body = base64.b64encode(response.body).decode("ascii")
    headers = [[name, value] for name, value in response.headers]
    expires_at = time.time() + ttl.total_seconds()
    entry = [VERSION, fingerprint, response.status, headers, body, expires_at]
    try:
        cache.set(cache_key(scope, key), entry, timeout=ttl.total_seconds())
    except Exception:
        logger.warning("The replay cache could not be written; replays will use the store.")


def forget(pairs: Iterable[tuple[str, str]]) -> None:
    """Remove the cached copies of the (scope, key) pairs."""
    cache = _cache()
    if cache is None:
        return
    names = [cache_key(scope, key) for scope, key in pairs]
    if not names:
        return
    try:
        cache.delete_many(names)
    except Exception:
        # Their copies still expire with their keys' TTL, which has passed or will soon.
        logger.warning("The replay cache could not be cleared of %d keys.", len(names))
