"""The cache store's durability guard: its options (checks E032, E033) and what it does.

These run in the default suite, beside the topology tests of ``tests/test_redis_ha.py``: the
checks need no Redis; the guard's own tests (marked ``redis``) start a master and a replica of
their own (``tests/redis_ha_support.py``), about a second's work.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from django_idempotency.checks import check_store_cache_durability
from django_idempotency.exceptions import IdempotencyStoreUnavailable
from django_idempotency.records import digest
from django_idempotency.stores import ClaimRequest, StoredResponse, cache
from django_idempotency.stores.cache import CacheStore, durability
from tests.redis_ha_support import Node, acknowledging, binaries, wait_until

CACHE_STORE = "django_idempotency.stores.CacheStore"


def use_options(settings, **options) -> None:
    settings.CACHES = {
        **settings.CACHES,
        "idempotency": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1, **options},
        },
    }
    settings.IDEMPOTENCY_STORE = CACHE_STORE
    settings.IDEMPOTENCY_STORE_CACHE = "idempotency"


def ids(messages) -> list[str]:
    return [message.id for message in messages]


def test_the_guard_is_off_unless_replicas_are_asked_for(settings):
    use_options(settings)

    assert check_store_cache_durability() == []
    assert durability("idempotency") == (0, 0.25)


def test_valid_guard_options_pass(settings):
    use_options(settings, IDEMPOTENCY_WAIT_REPLICAS=2, IDEMPOTENCY_WAIT_TIMEOUT=1)

    assert check_store_cache_durability() == []
    assert durability("idempotency") == (2, 1.0)


@pytest.mark.parametrize("value", [-1, 1.5, "1", True, None])
def test_e032_replicas_must_be_an_integer_zero_or_more(settings, value):
    use_options(settings, IDEMPOTENCY_WAIT_REPLICAS=value)

    messages = check_store_cache_durability()

    assert ids(messages) == ["django_idempotency.E032"]
    assert "'IDEMPOTENCY_WAIT_REPLICAS'" in messages[0].msg
    assert "'idempotency'" in messages[0].msg


@pytest.mark.parametrize("value", [0, -0.5, "0.5", False, None])
def test_e033_timeout_must_be_seconds_above_zero(settings, value):
    use_options(settings, IDEMPOTENCY_WAIT_TIMEOUT=value)

    messages = check_store_cache_durability()

    assert ids(messages) == ["django_idempotency.E033"]
    assert "'IDEMPOTENCY_WAIT_TIMEOUT'" in messages[0].msg


def test_both_bad_options_are_reported(settings):
    use_options(settings, IDEMPOTENCY_WAIT_REPLICAS=-1, IDEMPOTENCY_WAIT_TIMEOUT=0)

    assert ids(check_store_cache_durability()) == [
        "django_idempotency.E032",
        "django_idempotency.E033",
    ]


def test_the_options_are_not_checked_without_the_cache_store(settings):
    use_options(settings, IDEMPOTENCY_WAIT_REPLICAS=-1)
    settings.IDEMPOTENCY_STORE = "django_idempotency.stores.DatabaseStore"

    assert check_store_cache_durability() == []


def test_an_unknown_store_cache_is_left_to_e014(settings):
    settings.IDEMPOTENCY_STORE = CACHE_STORE
    settings.IDEMPOTENCY_STORE_CACHE = "missing"

    assert check_store_cache_durability() == []


def test_manage_py_check_fails_on_a_bad_guard_option(settings):
    pytest.importorskip("django_redis")  # tox minimal has no django-redis
    use_options(settings, IDEMPOTENCY_WAIT_TIMEOUT=0)

    with pytest.raises(Exception, match="E033"):
        call_command("check", tags=["caches"])


def test_a_bad_option_raises_where_no_check_ran(settings):
    use_options(settings, IDEMPOTENCY_WAIT_REPLICAS="one")

    with pytest.raises(ImproperlyConfigured, match="IDEMPOTENCY_WAIT_REPLICAS"):
        durability("idempotency")


def test_options_that_are_not_a_dict_have_no_guard_problems():
    assert CacheStore.durability_problems(None) == {}


def test_every_script_names_one_key_so_it_runs_whole_on_one_cluster_node():
    # A Redis Cluster runs a script only if all its keys hash to one slot. Each script here
    # names KEYS[1] alone; a second key would need a hash tag shared by both names.
    scripts = {name: value for name, value in vars(cache).items() if name.startswith("_LUA_")}
    assert scripts
    for name, script in scripts.items():
        assert set(re.findall(r"KEYS\[(\d+)\]", script)) <= {"1"}, name


# -- The guard on a real master and replica ----------------------------------------------------

RESPONSE = StoredResponse(status=201, headers=[("Content-Type", "text/plain")], body=b"first")


@pytest.fixture
def replicated(tmp_path, settings):
    """A master and its replica, and the cache store on the master, guarded: one replica."""
    server, _ = binaries()
    master = Node(server, tmp_path)
    replica = Node(server, tmp_path, "--replicaof", "127.0.0.1", str(master.port))
    try:
        wait_until(lambda: acknowledging(master, 1), "the replica acknowledges writes")
        alias = f"guarded-{uuid.uuid4().hex[:8]}"
        settings.CACHES = {
            **settings.CACHES,
            alias: {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": f"redis://127.0.0.1:{master.port}/0",
                "OPTIONS": {
                    "SOCKET_CONNECT_TIMEOUT": 1,
                    "SOCKET_TIMEOUT": 1,
                    "IDEMPOTENCY_WAIT_REPLICAS": 1,
                    "IDEMPOTENCY_WAIT_TIMEOUT": 0.2,
                },
            },
        }
        settings.IDEMPOTENCY_STORE = CACHE_STORE
        settings.IDEMPOTENCY_STORE_CACHE = alias
        yield master, replica, alias
    finally:
        replica.kill()
        master.kill()


def claim_for(key: str) -> ClaimRequest:
    return ClaimRequest(
        scope="anonymous",
        key=key,
        fingerprint="f" * 64,
        method="POST",
        path="/charges/",
        token=uuid.uuid4().hex,
        ttl=timedelta(minutes=2),
    )


def record_key(alias: str, key: str) -> str:
    from django.core.cache import caches

    name: str = caches[alias].make_key(f"django_idempotency:key:{digest(['anonymous', key])}")
    return name


@pytest.mark.redis
def test_a_guarded_claim_and_its_response_are_on_the_replica_when_the_call_returns(replicated):
    _, replica, alias = replicated
    claim = claim_for("order-1")
    store = CacheStore()

    assert store.claim(claim, lease=timedelta(seconds=30)).owner_token == claim.token
    # No waiting here: WAIT returned only once the replica had the write.
    assert replica.client.get(record_key(alias, "order-1")).startswith("P|")
    assert store.complete(claim, RESPONSE)
    assert replica.client.get(record_key(alias, "order-1")).startswith("C|")


@pytest.mark.redis
def test_a_guarded_claim_no_replica_acknowledges_is_503_and_taken_back(replicated):
    master, replica, alias = replicated
    replica.pause()
    try:
        with pytest.raises(IdempotencyStoreUnavailable):
            CacheStore().claim(claim_for("order-1"), lease=timedelta(seconds=30))
        assert not master.client.exists(record_key(alias, "order-1"))
    finally:
        replica.resume()


@pytest.mark.redis
def test_a_guarded_response_no_replica_acknowledges_is_a_failure_to_store(replicated):
    master, replica, alias = replicated
    claim = claim_for("order-1")
    store = CacheStore()
    store.claim(claim, lease=timedelta(seconds=30))
    replica.pause()
    try:
        with pytest.raises(IdempotencyStoreUnavailable):
            store.complete(claim, RESPONSE)
    finally:
        replica.resume()
    # Stored on the master all the same: replays work unless the master is lost.
    assert master.client.get(record_key(alias, "order-1")).startswith("C|")


@pytest.mark.redis
def test_a_claim_that_finds_the_key_taken_writes_nothing_and_is_not_refused(replicated):
    _, replica, _ = replicated
    store = CacheStore()
    first = claim_for("order-1")
    store.claim(first, lease=timedelta(seconds=30))
    replica.pause()
    try:
        found = store.claim(claim_for("order-1"), lease=timedelta(seconds=30))
    finally:
        replica.resume()
    assert found.owner_token == first.token  # the 409 of a running duplicate, not a 503
