"""``CacheStore``: keys in Redis, through a django-redis cache; the lease mode only.

The only module of the package that imports redis (inside functions, because the ``redis``
extra is optional and ``django_idempotency.stores`` always imports this module).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import timedelta
from typing import Any

from django.conf import settings
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
#
# Every script reads and writes exactly one key, KEYS[1], and no command of this module names
# two keys: on a Redis Cluster each operation goes whole to the node holding that key's slot,
# so no hash tag is needed. A script touching a second key would have to put a hash tag in
# both names ("{<digest>}"); tests/test_redis_ha.py fails when a script names KEYS[2].

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
def _redis_errors(alias: str) -> Iterator[None]:
    from redis.exceptions import AskError, RedisError  # the optional extra: imported when used

    try:
        yield
    except AskError as exc:  # MOVED or ASK (MovedError is an AskError)
        # A Redis Cluster node, reached by a client that does not follow the cluster's
        # redirections (a cluster client follows them): the keys of every other node would
        # fail forever, so this is no 503 to retry but a configuration to fix.
        raise ImproperlyConfigured(
            f"The cache {alias!r} points at a Redis Cluster through a client that is not a "
            "cluster client; set its OPTIONS['CONNECTION_FACTORY'] to "
            "'django_idempotency.stores.cache.RedisClusterConnectionFactory'."
        ) from exc
    except (RedisError, OSError) as exc:
        raise IdempotencyStoreUnavailable(retry_after=1) from exc


class RedisClusterConnectionFactory:
    """A django-redis connection factory for Redis Cluster (django-redis has no cluster client).

    Set as a cache's ``OPTIONS["CONNECTION_FACTORY"]``, with the ``LOCATION`` of any node: the
    client is redis-py's ``RedisCluster``, which finds the other nodes, sends each key to the
    node holding its hash slot and follows the cluster's redirections after a failover or a
    resharding. One client per location per process, as django-redis keeps its pools.
    The options ``SOCKET_TIMEOUT``, ``SOCKET_CONNECT_TIMEOUT``, ``USERNAME`` and ``PASSWORD``
    are passed on.
    """

    _clients: dict[str, Any] = {}

    def __init__(self, options: dict[str, Any]) -> None:
        names = {
            "SOCKET_TIMEOUT": "socket_timeout",
            "SOCKET_CONNECT_TIMEOUT": "socket_connect_timeout",
            "USERNAME": "username",
            "PASSWORD": "password",
        }
        self.kwargs = {name: options[option] for option, name in names.items() if option in options}

    def connect(self, url: str) -> Any:
        from redis.cluster import RedisCluster

        key = f"{url} {sorted(self.kwargs.items())}"
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = RedisCluster.from_url(url, **self.kwargs)
        return client

    def disconnect(self, connection: Any) -> None:
        connection.disconnect_connection_pools()


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

    @staticmethod
    def durability_problems(options: object) -> dict[str, str]:
        """What is wrong with the durability options of a cache's ``OPTIONS``, by option name."""
        if not isinstance(options, dict):
            return {}
        problems = {}
        replicas = options.get(WAIT_REPLICAS, 0)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            problems[WAIT_REPLICAS] = f"must be an integer, 0 or more, not {replicas!r}."
        timeout = options.get(WAIT_TIMEOUT, DEFAULT_WAIT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            problems[WAIT_TIMEOUT] = f"must be a number of seconds above 0, not {timeout!r}."
        return problems

    def _alias(self) -> str:
        return self.alias or conf.IDEMPOTENCY_STORE_CACHE

    def _client(self) -> Any:
        cache: Any = caches[self._alias()]
        client = getattr(cache, "client", None)
        if client is None or not hasattr(client, "get_client"):
            raise ImproperlyConfigured(
                f"The cache {self._alias()!r} is not a django-redis cache; CacheStore needs one."
            )
        return client.get_client(write=True)

    def _redis_key(self, claim_scope: str, claim_key: str) -> str:
        name: str = caches[self._alias()].make_key(
            f"django_idempotency:key:{digest([claim_scope, claim_key])}"
        )
        return name

    def _run(self, script: str, claim_scope: str, claim_key: str, *args: Any) -> Any:
        client = self._client()
        redis_key = self._redis_key(claim_scope, claim_key)
        with _redis_errors(self._alias()):
            return client.register_script(script)(keys=[redis_key], args=list(args))

    def _run_durably(
        self, script: str, claim_scope: str, claim_key: str, *args: Any
    ) -> tuple[Any, bool]:
        """Run a writing script, then ``WAIT`` for the cache's ``IDEMPOTENCY_WAIT_REPLICAS``.

        Returns the script's result and whether enough replicas acknowledged the write within
        ``IDEMPOTENCY_WAIT_TIMEOUT`` (always ``True`` when no replica is asked for).
        """
        replicas, timeout = durability(self._alias())
        if not replicas:
            return self._run(script, claim_scope, claim_key, *args), True
        from redis.cluster import RedisCluster
        from redis.exceptions import AskError

        client = self._client()
        redis_key = self._redis_key(claim_scope, claim_key)
        cluster: Any = client if isinstance(client, RedisCluster) else None
        with _redis_errors(self._alias()):
            if cluster is not None:
                # WAIT counts the writes of its own connection: send both to the node that
                # holds the key's slot, over one connection of that node.
                client = cluster.get_redis_connection(cluster.get_node_from_key(redis_key))
            pipeline = client.pipeline(transaction=False)
            client.register_script(script)(keys=[redis_key], args=list(args), client=pipeline)
            pipeline.execute_command("WAIT", replicas, max(round(timeout * 1000), 1))
            try:
                result, acknowledged = pipeline.execute()
            except AskError as exc:
                if cluster is None:
                    raise
                # The slot moved (a failover or a resharding): refresh the map for the next
                # request; this one is answered 503, as while any node is unreachable.
                cluster.nodes_manager.initialize()
                raise IdempotencyStoreUnavailable(retry_after=1) from exc
        return result, int(acknowledged) >= replicas

    def get(self, *, scope: str, key: str) -> Record | None:
        value, now = self._run(_LUA_GET, scope, key)
        return None if value is None else _decode(value, int(now))

    def claim(self, claim: ClaimRequest, *, lease: timedelta, insert: bool = True) -> Record:
        payload = _encode_payload(claim, None)
        ttl_ms, lease_ms = _ms(claim.ttl), _ms(lease)
        expected = b""  # the record must be absent
        for _ in range(3):
            (claimed, current, now), durable = self._run_durably(
                _LUA_CLAIM, claim.scope, claim.key, expected, claim.token, ttl_ms, lease_ms, payload
            )
            if claimed and not durable:
                # The claim may exist on the master alone, and a failover now would lose it,
                # letting a retry claim the key again while this view runs: the view must not
                # run. Take the claim back (if that fails too, it only holds retries off until
                # its lease passes), and answer 503.
                with suppress(IdempotencyStoreUnavailable):
                    self.release(claim)
                raise IdempotencyStoreUnavailable(retry_after=1)
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
        done, durable = self._run_durably(
            _LUA_COMPLETE, claim.scope, claim.key, claim.token, _ms(claim.ttl), payload
        )
        if done and not durable:
            # Stored on the master, perhaps not yet on a replica: a failover could bring the
            # unfinished claim back. The lease mode's failure to store (docs/contract.md).
            raise IdempotencyStoreUnavailable(retry_after=1)
        return bool(done)

    def release(self, claim: ClaimRequest) -> bool:
        return bool(self._run(_LUA_RELEASE, claim.scope, claim.key, claim.token))

    def renew(self, claim: ClaimRequest, *, lease: timedelta) -> bool:
        return bool(self._run(_LUA_RENEW, claim.scope, claim.key, claim.token, _ms(lease)))


#: The cache OPTIONS of the durability guard, and the guard's default timeout (seconds).
WAIT_REPLICAS = "IDEMPOTENCY_WAIT_REPLICAS"
WAIT_TIMEOUT = "IDEMPOTENCY_WAIT_TIMEOUT"
DEFAULT_WAIT_TIMEOUT = 0.25


def durability(alias: str) -> tuple[int, float]:
    """The replicas a write must reach, and how long to wait for them, for the cache ``alias``.

    Read from its ``OPTIONS`` (system checks E032 and E033 report bad values; where no check
    ran, a bad value raises ``ImproperlyConfigured`` naming it).
    """
    config: dict[str, Any] = settings.CACHES.get(alias) or {}
    options: dict[str, Any] = config.get("OPTIONS") or {}
    problems = CacheStore.durability_problems(options)
    if problems:
        raise ImproperlyConfigured(
            " ".join(
                f"CACHES[{alias!r}]['OPTIONS'][{name!r}] {problem}"
                for name, problem in problems.items()
            )
        )
    replicas: int = options.get(WAIT_REPLICAS, 0)
    return replicas, float(options.get(WAIT_TIMEOUT, DEFAULT_WAIT_TIMEOUT))


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
