"""``CacheStore``: keys in Redis, through a django-redis cache; the lease mode only.

The only module of the package that imports redis (inside :func:`_redis_errors`, because the
``redis`` extra is optional and ``django_idempotency.stores`` always imports this module).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import Any

from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured

from django_idempotency.conf import conf
from django_idempotency.exceptions import IdempotencyStoreUnavailable
from django_idempotency.records import (
    COMPLETED,
    IN_PROGRESS,
    ClaimRequest,
    Record,
    StoredResponse,
    digest,
)
from django_idempotency.stores.base import KeyVanished, may_take_over, owned_record

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

#: The fencing of the lease mode, first in every write after a claim: go on only while the
#: record is still the caller's unfinished claim (ARGV[1] is its token); else answer 0.
_LUA_OWNED = """
local current = redis.call('GET', KEYS[1])
local owned = 'P|' .. ARGV[1] .. '|'
if not current or string.sub(current, 1, #owned) ~= owned then return 0 end
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
    + _LUA_OWNED
    + """
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], 'C|' .. ARGV[1] .. '|' .. ms(now + ttl) .. '|0|' .. ARGV[3], 'PX', ttl)
return 1
"""
)

#: Delete the caller's unfinished claim.
_LUA_RELEASE = (
    _LUA_OWNED
    + """
redis.call('DEL', KEYS[1])
return 1
"""
)

#: Move the caller's lease deadline to now + ARGV[2] ms; the record lives at least that long.
_LUA_RENEW = (
    _LUA_NOW
    + _LUA_OWNED
    + """
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
    from redis.exceptions import RedisError  # the optional extra: imported when used

    try:
        yield
    except (RedisError, OSError) as exc:
        raise IdempotencyStoreUnavailable(retry_after=1) from exc


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
        return self.alias or conf.IDEMPOTENCY_STORE_CACHE

    def _client(self) -> Any:
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
                return owned_record(claim)
            if current is None:
                expected = b""  # gone since we read it (released): claim it as new
                continue
            record = _decode(current, int(now))
            if not may_take_over(record, claim):
                return record
            expected = current[: _header_length(current)]
        raise KeyVanished()  # the record keeps changing under us: let core try again at once

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
        expires_in=(int(expires) - now) / 1000,
        lease_remaining=None if completed else (int(lease) - now) / 1000,
    )
