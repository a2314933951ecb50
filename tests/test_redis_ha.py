"""The cache store and the replay cache on highly available Redis: Sentinel and Cluster.

Each test starts its own servers on free ports (``tests/redis_ha_support.py``): a master, a
replica and a sentinel, whose master is killed (SIGKILL) in the middle of a storm of retried
requests, with and without the durability guard (the cache OPTIONS
``IDEMPOTENCY_WAIT_REPLICAS`` and ``IDEMPOTENCY_WAIT_TIMEOUT``, ``CacheStore._run_durably``);
or a cluster of three masters, on which every operation of the store runs. Nothing is mocked.

Marked ``redis`` like the other Redis tests, and ``topology``: only IDEMPOTENCY_TOPOLOGIES=1
selects them (tests/conftest.py). They also need ``redis-server`` and ``redis-cli``. With
``-s`` the storms print the figures that the docs quote.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

from django_idempotency import replay_cache
from django_idempotency.records import digest
from django_idempotency.stores import CacheStore, ClaimRequest, StoredResponse
from tests import race_views
from tests.redis_ha_support import Cluster, SentinelGroup, binaries, wait_until
from tests.redis_support import (
    CACHE_STORE,
    Answer,
    assert_fresh_run,
    assert_in_progress,
    assert_replay_of,
    assert_store_unavailable,
)

pytestmark = [pytest.mark.redis, pytest.mark.topology]

SOCKET_TIMEOUT = 0.5  # seconds, for connecting and reading: bounds each 503 during failover
GUARD = {"IDEMPOTENCY_WAIT_REPLICAS": 1, "IDEMPOTENCY_WAIT_TIMEOUT": 0.25}
CLUSTER_FACTORY = "django_idempotency.stores.cache.RedisClusterConnectionFactory"
RESPONSE = StoredResponse(status=201, headers=[("Content-Type", "text/plain")], body=b"first")
TIMEOUT = 20  # seconds: a storm that does not finish fails its test


def use_cache(settings, entry) -> str:
    alias = f"ha-{uuid.uuid4().hex[:8]}"
    settings.CACHES = {**settings.CACHES, alias: entry}
    settings.IDEMPOTENCY_STORE = CACHE_STORE
    settings.IDEMPOTENCY_STORE_CACHE = alias
    return alias


def post(url: str, key: str) -> Answer:
    started = time.monotonic()
    response = Client(raise_request_exception=False).post(
        url, {"amount": 7}, content_type="application/json", headers={"Idempotency-Key": key}
    )
    return Answer.of(response, started)


def claim_for(key: str, scope: str = "anonymous") -> ClaimRequest:
    return ClaimRequest(
        scope=scope,
        key=key,
        fingerprint="f" * 64,
        method="POST",
        path="/charges/",
        token=uuid.uuid4().hex,
        ttl=timedelta(minutes=2),
    )


def record_key(alias: str, scope: str, key: str) -> str:
    """The Redis key of (scope, key)'s record: one key, so every script touches one slot."""
    name: str = caches[alias].make_key(f"django_idempotency:key:{digest([scope, key])}")
    return name


# -- Sentinel -------------------------------------------------------------------------------


@pytest.fixture
def sentinel(tmp_path):
    server, _ = binaries()
    group = SentinelGroup(server, tmp_path)
    yield group
    group.stop()


def sentinel_alias(settings, sentinel, **options) -> str:
    timeouts = {"SOCKET_CONNECT_TIMEOUT": SOCKET_TIMEOUT, "SOCKET_TIMEOUT": SOCKET_TIMEOUT}
    return use_cache(settings, sentinel.cache(**timeouts, **options))


@pytest.fixture
def sentinel_store(settings, sentinel):
    alias = sentinel_alias(settings, sentinel)
    yield alias
    caches[alias].client.disconnect()


@pytest.fixture
def guarded_sentinel_store(settings, sentinel):
    alias = sentinel_alias(settings, sentinel, **GUARD)
    yield alias
    caches[alias].client.disconnect()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def test_cache_store_and_replay_cache_work_through_sentinel(sentinel, sentinel_store, settings):
    note = uuid.uuid4().hex[:12]
    url = f"/race/count/lease/?note={note}"
    first = post(url, "order-1")
    assert_fresh_run(first)
    assert_replay_of(post(url, "order-1"), first)
    assert race_views.runs(note) == 1
    # The record is on the master the sentinel names, and has reached the replica.
    name = record_key(sentinel_store, "anonymous", "order-1")
    assert sentinel.master_port() == sentinel.master.port
    assert sentinel.master.client.exists(name)
    wait_until(lambda: sentinel.replica.client.exists(name), "the replica has the record")

    settings.IDEMPOTENCY_REPLAY_CACHE = sentinel_store
    replay_cache.remember("anonymous", "order-2", "f" * 64, RESPONSE, timedelta(minutes=1))
    # django-redis's Sentinel client reads from the replica: wait for it to catch up.
    wait_until(
        lambda: replay_cache.lookup("anonymous", "order-2") is not None, "a replay-cache hit"
    )
    record = replay_cache.lookup("anonymous", "order-2")
    assert record is not None
    assert record.response == RESPONSE
    replay_cache.forget([("anonymous", "order-2")])
    wait_until(lambda: replay_cache.lookup("anonymous", "order-2") is None, "the copy is gone")


def test_with_the_guard_a_claim_no_replica_acknowledged_is_503_and_the_view_does_not_run(
    sentinel, guarded_sentinel_store
):
    note = uuid.uuid4().hex[:12]
    url = f"/race/count/lease/?note={note}"
    sentinel.replica.pause()  # up, but acknowledging nothing
    try:
        refused = post(url, "order-1")
    finally:
        sentinel.replica.resume()

    assert_store_unavailable(refused)
    assert race_views.runs(note) == 0
    # The unacknowledged claim was taken back, so the retry needs no lease to pass.
    assert not sentinel.master.client.exists(
        record_key(guarded_sentinel_store, "anonymous", "order-1")
    )
    wait_until(lambda: sentinel.replica.client.ping(), "the replica answers again")
    first = post(url, "order-1")
    assert_fresh_run(first)
    assert_replay_of(post(url, "order-1"), first)
    assert race_views.runs(note) == 1


def test_without_the_guard_a_claim_lost_in_a_failover_lets_the_view_run_twice(
    sentinel, sentinel_store
):
    # Redis replication is asynchronous: the master acknowledges the claim (and the stored
    # response) before its replica has them. Made certain here: the replica is paused and its
    # replication link cut (what the master had sent would still be read from the socket).
    note = uuid.uuid4().hex[:12]
    url = f"/race/count/lease/?note={note}"
    sentinel.replica.pause()
    sentinel.master.client.client_kill_filter(_type="replica")
    first = post(url, "order-1")
    sentinel.master.kill()
    sentinel.replica.resume()
    wait_until(lambda: sentinel.master_port() == sentinel.replica.port, "the replica is master")

    def retry() -> Answer:
        answer = post(url, "order-1")
        return answer if answer.status != 503 else None  # the pools find the new master

    wait_until(retry, "a retry is answered by the new master")
    assert_fresh_run(first)
    assert race_views.runs(note) == 2  # the duplicate effect the guard exists to prevent


KEYS = 24
CLIENTS = 8
VIEW_SECONDS = 0.05
STORM_SECONDS = 6.0  # then the clients stop retrying: about three times the failover


@pytest.fixture
def sentinel_with_two_replicas(tmp_path):
    # With the guard asking for one replica, a group must keep one after losing its master.
    server, _ = binaries()
    group = SentinelGroup(server, tmp_path, replicas=2)
    yield group
    group.stop()


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "no-guard"])
def test_master_killed_during_a_storm_gives_503_or_correct_answers_never_a_second_run(
    sentinel_with_two_replicas, settings, guard
):
    sentinel = sentinel_with_two_replicas
    # Without the guard a second run is possible (the test above makes it certain), but needs
    # a claim to fall in the last moment before the kill: this storm reports it, and only the
    # guarded storm asserts that it never happens.
    alias = sentinel_alias(settings, sentinel, **(GUARD if guard else {}))
    note = uuid.uuid4().hex[:8]
    keys = [f"storm-{index}" for index in range(KEYS)]
    url = {key: f"/race/count/lease/?note={note}-{key}&sleep={VIEW_SECONDS}" for key in keys}
    answers: dict[str, list[Answer]] = {key: [] for key in keys}
    errors: list[BaseException] = []
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + STORM_SECONDS

    def client(index: int) -> None:
        # Every client sends every key, starting at a different one, and retries each until
        # it gets a 201 (first run or replay) or the storm ends: 503 and 409 are retried.
        try:
            for key in keys[index:] + keys[:index]:
                while time.monotonic() < deadline:
                    answer = post(url[key], key)
                    with lock:
                        answers[key].append(answer)
                    if answer.status == 201:
                        break
                    time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(map(len, answers.values())) >= 2 * KEYS, "the storm is under way")
    sentinel.master.kill()
    killed_at = time.monotonic() - started
    replicas = [node.port for node in sentinel.replicas]
    wait_until(lambda: sentinel.master_port() in replicas, "a replica is master")
    promoted_at = time.monotonic() - started
    for thread in threads:
        thread.join(STORM_SECONDS + TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a client never finished"
    assert not errors, errors

    outcome: Counter[str] = Counter()
    stranded: list[str] = []
    duplicated: list[str] = []
    store = CacheStore()
    for key in keys:
        runs = race_views.runs(f"{note}-{key}")
        fresh = [answer for answer in answers[key] if answer.status == 201 and not answer.replayed]
        # Never a second run, and never two different answers: one first run at most, and
        # every other answer a 503, a 409 or a replay of it.
        if not guard and runs > 1:
            duplicated.append(key)
            continue
        assert runs <= 1, (key, answers[key])
        assert len(fresh) == runs, (key, answers[key])
        for answer in answers[key]:
            if fresh and answer is fresh[0]:
                outcome["201 first run"] += 1
            elif answer.status == 503:
                assert_store_unavailable(answer)
                outcome["503 store unavailable"] += 1
            elif answer.status == 409:
                assert_in_progress(answer)
                outcome["409 in progress"] += 1
            else:
                assert_replay_of(answer, fresh[0])
                outcome["201 replay"] += 1
        record = store.get(scope="anonymous", key=key)
        if runs and (record is None or not record.completed):
            # The view ran, but its response could not be stored while there was no master:
            # the claim holds retries off (409) until its lease passes, then one runs again.
            stranded.append(key)
    caches[alias].client.disconnect()
    assert outcome["503 store unavailable"] > 0, outcome  # the kill did hit the storm
    elapsed = [answer.elapsed for key in keys for answer in answers[key]]
    runs = Counter(race_views.runs(f"{note}-{key}") for key in keys)
    print(  # the figures quoted in the docs (pytest -s shows them)
        f"\nsentinel failover storm, guard {'on' if guard else 'off'}: master killed at "
        f"{killed_at:.2f} s, replica promoted at {promoted_at:.2f} s; {len(elapsed)} requests: "
        f"{dict(outcome)}; p50 {statistics.median(elapsed) * 1000:.0f} ms, "
        f"p99 {percentile(elapsed, 0.99) * 1000:.0f} ms; keys by view runs {dict(runs)} "
        f"({KEYS} keys); ran twice: {duplicated}; ran but response not stored: {stranded}"
    )


# -- Cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    server, cli = binaries()
    cluster = Cluster(server, cli, tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_store(settings, cluster):
    return use_cache(
        settings,
        {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": cluster.location,
            "KEY_PREFIX": uuid.uuid4().hex[:8],
            "OPTIONS": {"CONNECTION_FACTORY": CLUSTER_FACTORY, "SOCKET_TIMEOUT": 2},
        },
    )


def test_every_store_operation_works_on_a_three_master_cluster(cluster_store):
    store = CacheStore()
    first, second, third = claim_for("order-1"), claim_for("order-1"), claim_for("order-2")

    assert store.get(scope="anonymous", key="order-1") is None
    assert store.claim(first, lease=timedelta(seconds=30)).owner_token == first.token
    claimed = store.claim(second, lease=timedelta(seconds=30))
    assert claimed.owner_token == first.token
    assert not claimed.completed
    assert store.renew(first, lease=timedelta(minutes=1))
    assert not store.renew(second, lease=timedelta(minutes=1))
    assert store.complete(first, RESPONSE)
    replay = store.claim(second, lease=timedelta(seconds=30))
    assert replay.completed
    assert replay.response == RESPONSE

    assert store.claim(third, lease=timedelta(seconds=30)).owner_token == third.token
    assert store.release(third)
    assert store.get(scope="anonymous", key="order-2") is None
    assert not store.release(third)


def test_requests_are_claimed_and_replayed_through_the_cluster(cluster_store):
    note = uuid.uuid4().hex[:12]
    url = f"/race/count/lease/?note={note}"
    firsts = {key: post(url, key) for key in ("order-1", "order-2", "order-3")}
    for key, first in firsts.items():
        assert_fresh_run(first)
        assert_replay_of(post(url, key), first)
    assert race_views.runs(note) == 3


def test_replay_cache_works_on_the_cluster(cluster_store, settings):
    settings.IDEMPOTENCY_REPLAY_CACHE = cluster_store
    pairs = [("anonymous", f"order-{index}") for index in range(12)]
    for scope, key in pairs:
        replay_cache.remember(scope, key, "f" * 64, RESPONSE, timedelta(minutes=1))
    for scope, key in pairs:
        record = replay_cache.lookup(scope, key)
        assert record is not None
        assert record.response == RESPONSE

    replay_cache.forget(pairs)  # one DEL of keys in many slots: the cluster client splits it

    assert all(replay_cache.lookup(scope, key) is None for scope, key in pairs)


def test_a_plain_client_on_a_cluster_node_is_a_configuration_error(cluster, settings):
    alias = use_cache(
        settings, {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": cluster.location}
    )
    client = caches[alias].client.get_client(write=True)
    mine = cluster.nodes[0].client.cluster("slots")
    owned = {
        slot
        for start, end, (_, port, *_), *_ in mine
        if port == cluster.nodes[0].port
        for slot in range(start, end + 1)
    }
    elsewhere = next(
        f"order-{index}"
        for index in range(1000)
        if cluster.nodes[0].client.cluster(
            "keyslot", record_key(alias, "anonymous", f"order-{index}")
        )
        not in owned
    )

    with pytest.raises(ImproperlyConfigured, match="RedisClusterConnectionFactory"):
        CacheStore().claim(claim_for(elsewhere), lease=timedelta(seconds=30))
    client.connection_pool.disconnect()


def keys_on_each_master(cluster, alias: str) -> list[str]:
    """One key per master of the cluster, so that a test runs every operation on all three."""
    found: dict[int, str] = {}
    slots = cluster.nodes[0].client.cluster("slots")
    for index in range(1000):
        key = f"order-{index}"
        slot = cluster.nodes[0].client.cluster("keyslot", record_key(alias, "anonymous", key))
        port = next(node[1] for start, end, node, *_ in slots if start <= slot <= end)
        found.setdefault(port, key)
        if len(found) == len(cluster.nodes):
            return list(found.values())
    pytest.fail("no key found for every master")


def test_every_operation_works_on_each_master_of_the_cluster(cluster, cluster_store):
    # Every script names one key (tests/test_redis_ha_checks.py), so each runs whole on the
    # node holding that key's slot; here on each of the three.
    store = CacheStore()
    for key in keys_on_each_master(cluster, cluster_store):
        first, second = claim_for(key), claim_for(key)
        assert store.claim(first, lease=timedelta(seconds=30)).owner_token == first.token
        assert store.renew(first, lease=timedelta(minutes=1))
        assert store.complete(first, RESPONSE)
        assert store.claim(second, lease=timedelta(seconds=30)).response == RESPONSE
        assert store.get(scope="anonymous", key=key).completed


def test_the_guard_on_a_cluster_without_replicas_refuses_every_claim(cluster, settings):
    alias = use_cache(
        settings,
        {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": cluster.location,
            "KEY_PREFIX": uuid.uuid4().hex[:8],
            "OPTIONS": {"CONNECTION_FACTORY": CLUSTER_FACTORY, "SOCKET_TIMEOUT": 2, **GUARD},
        },
    )
    note = uuid.uuid4().hex[:12]
    url = f"/race/count/lease/?note={note}"
    for key in keys_on_each_master(cluster, alias):
        assert_store_unavailable(post(url, key))
        assert CacheStore().get(scope="anonymous", key=key) is None  # taken back, on its node
    assert race_views.runs(note) == 0


CLUSTER_CLIENTS = 8
CLUSTER_KEYS = 200


def test_a_storm_on_the_cluster_runs_each_key_once(cluster_store):
    note = uuid.uuid4().hex[:8]
    keys = [f"storm-{index}" for index in range(CLUSTER_KEYS)]
    answers: list[Answer] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        # Every client sends every key once, from a different start; a 409 is not retried.
        try:
            for key in keys[index * 7 :] + keys[: index * 7]:
                answer = post(f"/race/count/lease/?note={note}-{key}", key)
                with lock:
                    answers.append(answer)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLUSTER_CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 6)
    seconds = time.monotonic() - started
    assert not errors, errors

    runs = Counter(race_views.runs(f"{note}-{key}") for key in keys)
    assert runs == {1: CLUSTER_KEYS}
    statuses = Counter("replay" if answer.replayed else str(answer.status) for answer in answers)
    assert set(statuses) <= {"201", "replay", "409"}, statuses
    elapsed = [answer.elapsed for answer in answers]
    print(
        f"\ncluster storm: {len(answers)} requests in {seconds:.2f} s "
        f"({len(answers) / seconds:.0f}/s, {CLUSTER_CLIENTS} threads in one process): "
        f"{dict(statuses)}; p50 {statistics.median(elapsed) * 1000:.1f} ms, "
        f"p99 {percentile(elapsed, 0.99) * 1000:.1f} ms; keys by view runs {dict(runs)}"
    )
