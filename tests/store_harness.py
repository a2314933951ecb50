"""One harness per store, so the contract suites can look at and seed keys in any store.

A test asks the ``store`` fixture (``tests/conftest.py``) for what a store holds in
store-neutral terms: ``count()``, ``get(key)`` (a :class:`KeyView`), ``snapshot()`` (to
compare before and after), and seeds keys with ``plant()``, ``expire()`` and ``set_lease()``.
Every deadline is set and read on the store's own clock: the database's ``Now()`` for
:class:`DatabaseHarness`, Redis ``TIME`` for :class:`CacheHarness`, which reads and writes the
cache store's raw records itself rather than trusting the store's code to decode them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.db.models.functions import Now

from django_idempotency.models import IdempotencyKey
from tests.factories import IdempotencyKeyFactory

DATABASE = "database"
CACHE = "cache"
CACHE_STORE = "django_idempotency.stores.CacheStore"
#: The suite's Redis cache (``tests/settings.py``, with ``REDIS_URL``). Each test's cache store
#: uses a copy of it under a key prefix of its own.
CACHE_ALIAS = "redis"

IN_PROGRESS = IdempotencyKey.State.IN_PROGRESS.value
COMPLETED = IdempotencyKey.State.COMPLETED.value

#: What ``plant(..., response=STORED)`` stores: a 201 JSON answer.
STORED = (201, [("Content-Type", "application/json")], b'{"stored": true}')

#: Run a test with the database store only. Each use says why: the set is kept minimal.
database_only = pytest.mark.parametrize("store", [DATABASE], indirect=True)
#: Run a test with the cache store only.
cache_only = pytest.mark.parametrize(
    "store", [pytest.param(CACHE, marks=pytest.mark.redis)], indirect=True
)


@dataclass(frozen=True)
class KeyView:
    """A key's record as a test sees it."""

    state: str
    fingerprint: str
    method: str
    path: str
    status: int | None
    headers: list[tuple[str, str]]
    body: bytes | None
    #: Time left until the key's TTL passes (negative once it has), on the store's clock.
    expires_in: timedelta
    #: Time left on an unfinished lease-mode claim's lease; ``None`` when it has none.
    lease: timedelta | None


class DatabaseHarness:
    """Keys as ``IdempotencyKey`` rows, on the default database."""

    name = DATABASE
    supports_atomic = True

    @property
    def advisory_claims(self) -> bool:
        """Whether the atomic mode claims an absent key with advisory locks, writing no row
        until the response is stored (``DatabaseStore.claims``: PostgreSQL, plain SQL)."""
        from django_idempotency.conf import get_store

        store = get_store()
        return bool(store._advisory(store._alias()))

    def __init__(self, request: Any = None) -> None:
        self._request = request

    def clear(self) -> None:
        """Nothing to do: the test's transaction (or flush) takes the rows away."""

    def count(self) -> int:
        return IdempotencyKey.objects.count()

    def get(self, key: str, *, scope: str = "anonymous") -> KeyView | None:
        row = IdempotencyKey.objects.annotate(db_now=Now()).filter(scope=scope, key=key).first()
        if row is None:
            return None
        lease = None if row.lease_until is None else row.lease_until - row.db_now
        return KeyView(
            state=row.state,
            fingerprint=row.fingerprint,
            method=row.method,
            path=row.path,
            status=row.response_status,
            headers=[(name, value) for name, value in row.response_headers],
            body=None if row.response_body is None else bytes(row.response_body),
            expires_in=row.expires_at - row.db_now,
            lease=lease if row.state == IN_PROGRESS else None,
        )

    def snapshot(self) -> list[dict[str, Any]]:
        """Every row, as plain values, to compare before and after."""
        rows = list(IdempotencyKey.objects.order_by("pk").values())
        for row in rows:
            if row["response_body"] is not None:
                row["response_body"] = bytes(row["response_body"])
        return rows

    def plant(
        self,
        key: str,
        *,
        fingerprint: str,
        scope: str = "anonymous",
        method: str = "POST",
        path: str = "/sync/",
        lease: timedelta | None = timedelta(seconds=30),
        expired: bool = False,
        response: tuple[int, list[tuple[str, str]], bytes] | None = None,
    ) -> None:
        """Store a key as another request left it: unfinished with ``lease`` (``None``: an
        atomic-mode claim, with no lease), or completed with ``response``."""
        options: dict[str, Any] = {}
        if response is not None:
            status, headers, body = response
            options = {
                "completed": True,
                "response_status": status,
                "response_headers": [list(header) for header in headers],
                "response_body": body,
            }
        row = IdempotencyKeyFactory(
            key=key, scope=scope, method=method, path=path, fingerprint=fingerprint, **options
        )
        IdempotencyKey.objects.filter(pk=row.pk).update(
            expires_at=Now() + (timedelta(hours=-1) if expired else timedelta(hours=24)),
            lease_until=None if lease is None or response is not None else Now() + lease,
        )

    def expire(self, key: str, *, scope: str = "anonymous") -> None:
        """Make the key's TTL pass a second ago."""
        self._row(key, scope).update(expires_at=Now() - timedelta(seconds=1))

    def set_expiry(self, key: str, expires_in: timedelta, *, scope: str = "anonymous") -> None:
        """Move the key's expiry to ``expires_in`` from now (negative: passed)."""
        self._row(key, scope).update(expires_at=Now() + expires_in)

    def set_lease(self, key: str, lease: timedelta, *, scope: str = "anonymous") -> None:
        """Move an unfinished key's lease deadline to ``lease`` from now (negative: passed)."""
        self._row(key, scope).update(lease_until=Now() + lease)

    def make_unreachable(self) -> None:
        """Point ``IDEMPOTENCY_STORE`` at a database store whose database cannot be reached."""
        self._request.getfixturevalue("offline_store")

    def _row(self, key: str, scope: str) -> Any:
        rows = IdempotencyKey.objects.filter(scope=scope, key=key)
        assert rows.exists(), f"no key {key!r} in scope {scope!r}"
        return rows


class CacheHarness:
    """Keys as the cache store's Redis records, read and written raw.

    A record is one string, ``<P|C>|<owner token>|<expires ms>|<lease deadline ms>|`` then a
    line of JSON (fingerprint, method, path, and the response's status, headers and whether
    its body was stored) and the body; deadlines are milliseconds on the Redis server's clock.
    """

    name = CACHE
    supports_atomic = False
    advisory_claims = False

    def __init__(self, request: Any = None, *, alias: str = CACHE_ALIAS) -> None:
        from django.core.cache import caches

        self._request = request
        self.cache: Any = caches[alias]
        self.client = self.cache.client.get_client(write=True)

    @classmethod
    def configure(cls, request: Any) -> CacheHarness:
        """Make ``CacheStore`` the store, on a cache alias with a key prefix of this test's own.

        Deleting that prefix's keys, rather than flushing the database, leaves alone whatever
        else uses the same Redis database at the same time (another test run, say).
        """
        settings = request.getfixturevalue("settings")
        token = uuid.uuid4().hex[:12]
        alias = f"store-{token}"
        settings.CACHES = {
            **settings.CACHES,
            alias: {**settings.CACHES[CACHE_ALIAS], "KEY_PREFIX": f"idempotency-test-{token}"},
        }
        settings.IDEMPOTENCY_STORE = CACHE_STORE
        settings.IDEMPOTENCY_STORE_CACHE = alias
        return cls(request, alias=alias)

    def clear(self) -> None:
        """Delete every key under this cache's prefix."""
        names = list(self.client.scan_iter(match=self.cache.make_key("*")))
        if names:
            self.client.delete(*names)

    def count(self) -> int:
        return len(self._redis_keys())

    def get(self, key: str, *, scope: str = "anonymous") -> KeyView | None:
        value = self.client.get(self.redis_key(key, scope))
        if value is None:
            return None
        state, _, expires, lease, payload = value.split(b"|", 4)
        line, _, body = payload.partition(b"\n")
        head = json.loads(line)
        now = self._now()
        completed = state == b"C"
        assert state in (b"P", b"C"), value
        return KeyView(
            state=COMPLETED if completed else IN_PROGRESS,
            fingerprint=head["fingerprint"],
            method=head["method"],
            path=head["path"],
            status=head["status"] if completed else None,
            headers=[(name, value) for name, value in head["headers"]] if completed else [],
            body=body if completed and head["stored"] else None,
            expires_in=timedelta(milliseconds=int(expires) - now),
            lease=None if completed else timedelta(milliseconds=int(lease) - now),
        )

    def snapshot(self) -> dict[bytes, bytes]:
        """Every record, raw, to compare before and after."""
        return {name: self.client.get(name) for name in sorted(self._redis_keys())}

    def plant(
        self,
        key: str,
        *,
        fingerprint: str,
        scope: str = "anonymous",
        method: str = "POST",
        path: str = "/sync/",
        lease: timedelta | None = timedelta(seconds=30),
        expired: bool = False,
        response: tuple[int, list[tuple[str, str]], bytes] | None = None,
    ) -> None:
        """Store a key as another request left it: unfinished with ``lease``, or completed
        with ``response``. The cache store has no atomic mode, so no claim without a lease."""
        assert lease is not None or response is not None, "the cache store has no atomic mode"
        now = self._now()
        expires = now + (-3_600_000 if expired else 86_400_000)
        head: dict[str, Any] = {"fingerprint": fingerprint, "method": method, "path": path}
        body = b""
        if response is None:
            assert lease is not None
            state, deadline = b"P", now + _ms(lease)
        else:
            status, headers, body = response
            head.update(status=status, headers=[list(header) for header in headers], stored=True)
            state, deadline = b"C", 0
        header = b"|".join(
            [state, uuid.uuid4().hex.encode(), str(expires).encode(), str(deadline).encode(), b""]
        )
        value = header + json.dumps(head).encode() + b"\n" + body
        # Redis keeps an expired record for a while after its TTL: the store must see past it.
        self.client.set(self.redis_key(key, scope), value, px=_lifetime(now, expires, deadline))

    def expire(self, key: str, *, scope: str = "anonymous") -> None:
        """Make the key's TTL pass a second ago."""
        self._rewrite(key, scope, expires=self._now() - 1000)

    def set_expiry(self, key: str, expires_in: timedelta, *, scope: str = "anonymous") -> None:
        """Move the key's expiry to ``expires_in`` from now (negative: passed)."""
        self._rewrite(key, scope, expires=self._now() + _ms(expires_in))

    def set_lease(self, key: str, lease: timedelta, *, scope: str = "anonymous") -> None:
        """Move an unfinished key's lease deadline to ``lease`` from now (negative: passed)."""
        self._rewrite(key, scope, deadline=self._now() + _ms(lease))

    def make_unreachable(self) -> None:
        """Point the cache store at a Redis server that is not there (nothing listens on 1)."""
        settings = self._request.getfixturevalue("settings")
        settings.CACHES = {
            **settings.CACHES,
            "unreachable": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": "redis://127.0.0.1:1/0",
                "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
            },
        }
        settings.IDEMPOTENCY_STORE_CACHE = "unreachable"

    def redis_key(self, key: str, scope: str) -> str:
        """The Redis key of (scope, key), as the cache store names it."""
        name = json.dumps([scope, key], ensure_ascii=False).encode("utf-8", "surrogatepass")
        return self.cache.make_key(f"django_idempotency:key:{hashlib.sha256(name).hexdigest()}")

    def _redis_keys(self) -> list[bytes]:
        return list(self.client.scan_iter(match=self.cache.make_key("django_idempotency:key:*")))

    def _now(self) -> int:
        seconds, microseconds = self.client.time()
        return seconds * 1000 + microseconds // 1000

    def _rewrite(
        self, key: str, scope: str, *, expires: int | None = None, deadline: int | None = None
    ) -> None:
        name = self.redis_key(key, scope)
        value = self.client.get(name)
        assert value is not None, f"no key {key!r} in scope {scope!r}"
        state, token, old_expires, old_deadline, payload = value.split(b"|", 4)
        expires = int(old_expires) if expires is None else expires
        deadline = int(old_deadline) if deadline is None else deadline
        header = b"|".join([state, token, str(expires).encode(), str(deadline).encode(), b""])
        self.client.set(name, header + payload, px=_lifetime(self._now(), expires, deadline))


def _ms(duration: timedelta) -> int:
    return int(duration.total_seconds() * 1000)


def _lifetime(now: int, expires: int, deadline: int) -> int:
    return max(expires - now, deadline - now, 60_000)


Harness = DatabaseHarness | CacheHarness


def harness_for(name: str, request: Any) -> Harness:
    """Make the store called ``name`` (``"database"`` or ``"cache"``) the configured one for
    the test of ``request``; return its harness."""
    return DatabaseHarness(request) if name == DATABASE else CacheHarness.configure(request)


def current_harness() -> Harness:
    """The harness of the configured store (``IDEMPOTENCY_STORE``), for the views under test."""
    from django_idempotency.conf import conf, get_store
    from django_idempotency.stores import CacheStore

    if isinstance(get_store(), CacheStore):
        return CacheHarness(alias=conf.IDEMPOTENCY_STORE_CACHE)
    return DatabaseHarness()
