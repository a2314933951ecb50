"""The cache store's own guarantees, against a real Redis (``REDIS_URL``).

docs/modes.md, "The lease mode": a claim is set-if-absent; every write after
it is fenced by the owner token, so a request whose lease was taken over can neither complete,
release nor renew the new owner's record; only a dead request's passed lease is taken over,
and only by the same request; a live lease outlives the key's TTL and is renewed while the
view runs. Records live for the key's TTL in Redis itself (``PTTL``), under the cache's
``KEY_PREFIX`` and ``VERSION``, and keys of two scopes never meet.

Nothing is mocked: the store talks to Redis, the views run in real threads. Each test has a
cache alias with a key prefix of its own and deletes its keys afterwards. The views write
nothing to the database, so these tests run the same whatever ``DATABASE_URL`` says.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.test import Client

from django_idempotency.stores import CacheStore, ClaimRequest, Record, StoredResponse
from tests import race_views
from tests.redis_support import (
    Answer,
    assert_fresh_run,
    assert_in_progress,
    assert_replay_of,
    delete_keys,
    new_prefix,
    raw_client,
    use_cache_store,
)

pytestmark = pytest.mark.redis

DUPLICATES = 16
TIMEOUT = 10  # seconds: a stuck thread fails its test instead of hanging the run
FINGERPRINT = "f" * 64
OTHER_FINGERPRINT = "0" * 64
RESPONSE = StoredResponse(status=201, headers=[("Content-Type", "text/plain")], body=b"first")


class Redis:
    """The test's cache alias: its store, and the raw records under its key prefix."""

    def __init__(self, alias: str, prefix: str) -> None:
        self.alias, self.prefix = alias, prefix
        self.client = raw_client(alias)

    def store(self, alias: str | None = None) -> CacheStore:
        store = CacheStore()
        store.alias = alias or self.alias
        return store

    def stored_keys(self) -> list[bytes]:
        return sorted(self.client.scan_iter(match=f"{self.prefix}:*", count=1000))

    def only_key(self) -> bytes:
        (key,) = self.stored_keys()
        return key

    def pttl(self) -> int:
        """Milliseconds the test's one record has left in Redis."""
        pttl: int = self.client.pttl(self.only_key())
        return pttl


@pytest.fixture
def redis(settings):
    prefix = new_prefix()
    location = django_settings.CACHES["redis"]["LOCATION"]
    alias = use_cache_store(settings, location, KEY_PREFIX=prefix)
    redis = Redis(alias, prefix)
    yield redis
    delete_keys(redis.client, prefix)


def request_for(
    key: str,
    *,
    scope: str = "anonymous",
    fingerprint: str = FINGERPRINT,
    ttl: timedelta = timedelta(minutes=2),
) -> ClaimRequest:
    """One request's claim on ``key``, with a token of its own."""
    return ClaimRequest(
        scope=scope,
        key=key,
        fingerprint=fingerprint,
        method="POST",
        path="/charges/",
        token=uuid.uuid4().hex,
        ttl=ttl,
    )


def owns(record: Record, claim: ClaimRequest) -> bool:
    return record.owner_token == claim.token


def wait_until_lease_passes(store: CacheStore, claim: ClaimRequest) -> None:
    """Wait until the key's lease has passed on the Redis server's clock."""
    deadline = time.monotonic() + TIMEOUT
    while (record := store.get(scope=claim.scope, key=claim.key)) is not None:
        assert record.lease_remaining is not None
        if record.lease_remaining <= 0:
            return
        assert time.monotonic() < deadline, "the lease never passed"
        time.sleep(0.02)


def wait_until_gone(store: CacheStore, claim: ClaimRequest) -> None:
    deadline = time.monotonic() + TIMEOUT
    while store.get(scope=claim.scope, key=claim.key) is not None:
        assert time.monotonic() < deadline, "the record never expired"
        time.sleep(0.02)


def in_threads(function: Callable[[int], Any], n: int = DUPLICATES) -> list[Any]:
    """Call ``function(index)`` in ``n`` threads released together; return the results."""
    barrier = threading.Barrier(n, timeout=TIMEOUT)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait()
            results[index] = function(index)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"still running after {TIMEOUT} s"
    if errors:
        raise errors[0]
    return results


# -- Claims ---------------------------------------------------------------------------------


def test_claim_writes_a_record_only_when_the_key_is_absent(redis):
    store = redis.store()
    first, second = request_for("order-1"), request_for("order-1")

    claimed = store.claim(first, lease=timedelta(seconds=30))
    found = store.claim(second, lease=timedelta(seconds=30))

    assert owns(claimed, first)
    assert not owns(found, second)
    assert owns(found, first)
    assert not found.completed
    assert 0 < found.lease_remaining <= 30
    assert redis.client.get(redis.only_key()).startswith(f"P|{first.token}|".encode())


def test_simultaneous_claims_of_a_new_key_leave_exactly_one_owner(redis):
    store = redis.store()
    claims = [request_for("order-1") for _ in range(DUPLICATES)]

    records = in_threads(lambda index: store.claim(claims[index], lease=timedelta(seconds=30)))

    winners = [claim for claim, record in zip(claims, records, strict=True) if owns(record, claim)]
    assert len(winners) == 1
    assert {record.owner_token for record in records} == {winners[0].token}
    assert len(redis.stored_keys()) == 1


def test_live_lease_is_not_taken_over_even_by_the_same_request(redis):
    store = redis.store()
    first = request_for("order-1")
    store.claim(first, lease=timedelta(seconds=30))

    retry = request_for("order-1")
    record = store.claim(retry, lease=timedelta(seconds=30))

    assert owns(record, first)
    assert owns(store.get(scope=first.scope, key=first.key), first)


def test_passed_lease_is_taken_over_only_by_the_same_request(redis):
    store = redis.store()
    dead = request_for("order-1")
    store.claim(dead, lease=timedelta(milliseconds=200))
    wait_until_lease_passes(store, dead)

    different = request_for("order-1", fingerprint=OTHER_FINGERPRINT)
    refused = store.claim(different, lease=timedelta(seconds=30))
    retry = request_for("order-1")
    taken = store.claim(retry, lease=timedelta(seconds=30))

    # The dead request may have had side effects: only the same request may finish its work.
    assert owns(refused, dead)
    assert owns(taken, retry)
    record = store.get(scope=retry.scope, key=retry.key)
    assert owns(record, retry)
    assert record.lease_remaining > 20


def test_request_whose_lease_was_taken_over_cannot_complete_release_or_renew(redis):
    store = redis.store()
    slow = request_for("order-1")
    store.claim(slow, lease=timedelta(milliseconds=200))
    wait_until_lease_passes(store, slow)
    retry = request_for("order-1")
    assert owns(store.claim(retry, lease=timedelta(seconds=30)), retry)
    before = redis.client.get(redis.only_key())

    assert store.renew(slow, lease=timedelta(milliseconds=1)) is False
    assert store.complete(slow, RESPONSE) is False
    assert store.release(slow) is False

    assert redis.client.get(redis.only_key()) == before
    record = store.get(scope=retry.scope, key=retry.key)
    assert owns(record, retry)
    assert not record.completed
    assert record.lease_remaining > 20
    assert store.complete(retry, StoredResponse(201, [], b"second")) is True
    assert store.release(slow) is False
    assert store.get(scope=retry.scope, key=retry.key).response.body == b"second"


def test_owner_can_renew_complete_and_release_its_own_claim(redis):
    store = redis.store()
    done, abandoned = request_for("order-1"), request_for("order-2")
    store.claim(done, lease=timedelta(seconds=30))
    store.claim(abandoned, lease=timedelta(seconds=30))

    assert store.renew(done, lease=timedelta(seconds=60)) is True
    assert store.get(scope=done.scope, key=done.key).lease_remaining > 50
    assert store.complete(done, RESPONSE) is True
    assert store.release(abandoned) is True

    record = store.get(scope=done.scope, key=done.key)
    assert record.completed
    assert record.response == RESPONSE
    assert store.get(scope=abandoned.scope, key=abandoned.key) is None
    # A completed record is no longer the owner's to renew, complete again or release.
    assert store.renew(done, lease=timedelta(seconds=60)) is False
    assert store.complete(done, StoredResponse(200, [], b"again")) is False
    assert store.release(done) is False
    assert store.get(scope=done.scope, key=done.key).response == RESPONSE


# -- How long records live -------------------------------------------------------------------


def test_completed_record_lives_for_the_keys_ttl(redis):
    store = redis.store()
    claim = request_for("order-1", ttl=timedelta(seconds=120))
    store.claim(claim, lease=timedelta(seconds=30))
    assert 119_000 < redis.pttl() <= 120_000  # an unfinished claim: the longer of TTL and lease

    store.complete(claim, RESPONSE)

    assert 119_000 < redis.pttl() <= 120_000


def test_record_reads_the_time_left_until_the_key_expires_on_the_servers_clock(redis):
    store = redis.store()
    claim = request_for("order-1", ttl=timedelta(seconds=120))
    store.claim(claim, lease=timedelta(seconds=30))
    store.complete(claim, RESPONSE)

    record = store.get(scope=claim.scope, key=claim.key)
    duplicate = store.claim(request_for("order-1"), lease=timedelta(seconds=30))

    assert record is not None
    for found in (record, duplicate):
        assert found.completed
        assert found.expires_in == pytest.approx(redis.pttl() / 1000, abs=0.5)
        assert 119 < found.expires_in <= 120


def test_completed_record_is_gone_once_its_ttl_passes_and_the_key_is_new_again(redis):
    store = redis.store()
    first = request_for("order-1", ttl=timedelta(milliseconds=300))
    store.claim(first, lease=timedelta(seconds=30))
    store.complete(first, RESPONSE)
    assert 0 < redis.pttl() <= 300

    wait_until_gone(store, first)

    assert redis.stored_keys() == []
    different = request_for("order-1", fingerprint=OTHER_FINGERPRINT)
    assert owns(store.claim(different, lease=timedelta(seconds=30)), different)


def test_live_lease_keeps_the_record_past_its_ttl(redis):
    store = redis.store()
    slow = request_for("order-1", ttl=timedelta(milliseconds=200))
    lease = timedelta(seconds=1)
    store.claim(slow, lease=lease)
    assert 200 < redis.pttl() <= 1000  # the lease, longer than the TTL

    # Renewed (as the heartbeat does, every third of the lease) past the TTL and the lease.
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        assert store.renew(slow, lease=lease) is True
        time.sleep(0.3)

    record = store.get(scope=slow.scope, key=slow.key)
    assert not record.live
    assert record.lease_remaining > 0
    assert 0 < redis.pttl() <= 1000
    retry = request_for("order-1", ttl=timedelta(milliseconds=200))
    assert owns(store.claim(retry, lease=lease), slow)

    # Once renewals stop (the request died), the record goes with its lease.
    wait_until_gone(store, slow)
    assert owns(store.claim(retry, lease=lease), retry)


# -- Where records live ----------------------------------------------------------------------


def test_key_prefix_and_version_of_the_cache_are_respected(redis, settings):
    location = django_settings.CACHES["redis"]["LOCATION"]
    prefix = redis.prefix
    settings.CACHES = {
        **settings.CACHES,
        "v3": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": location,
               "KEY_PREFIX": prefix, "VERSION": 3},
        "v4": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": location,
               "KEY_PREFIX": prefix, "VERSION": 4},
        "other": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": location,
                  "KEY_PREFIX": f"{prefix}-other", "VERSION": 3},
    }  # fmt: skip
    claims = {alias: request_for("order-1") for alias in ("v3", "v4", "other")}
    try:
        for alias, claim in claims.items():
            assert owns(redis.store(alias).claim(claim, lease=timedelta(seconds=30)), claim)

        assert [key.decode().rsplit(":", 1)[0] for key in redis.stored_keys()] == [
            f"{prefix}:3:django_idempotency:key",
            f"{prefix}:4:django_idempotency:key",
        ]
        for alias, claim in claims.items():
            record = redis.store(alias).get(scope=claim.scope, key=claim.key)
            assert owns(record, claim)
    finally:
        delete_keys(redis.client, f"{prefix}-other")


def test_two_scopes_never_share_a_record(redis):
    store = redis.store()
    # Scopes and keys that would collide if they were joined with a separator.
    pairs = [("user:1", "order-1"), ("user:2", "order-1"), ("user", "1:order-1"), ("", "x")]
    pairs += [("user:1", "order-1 "), ("a|b", "c"), ("a", "b|c"), ("a\x00b", "c"), ("a", "b\x00c")]
    claims = [request_for(key, scope=scope) for scope, key in pairs]

    records = [store.claim(claim, lease=timedelta(seconds=30)) for claim in claims]
    store.complete(claims[0], RESPONSE)

    assert all(owns(record, claim) for record, claim in zip(records, claims, strict=True))
    assert len(redis.stored_keys()) == len(pairs)
    assert store.get(scope="user:1", key="order-1").completed
    for claim in claims[1:]:
        record = store.get(scope=claim.scope, key=claim.key)
        assert owns(record, claim)
        assert not record.completed


# -- Through a view, in real threads ---------------------------------------------------------


def new_note() -> str:
    return uuid.uuid4().hex[:12]


def post(client: Client, url: str, key: str, **headers: str) -> Answer:
    started = time.monotonic()
    response = client.post(
        url, {"amount": 7}, content_type="application/json",
        headers={"Idempotency-Key": key, **headers},
    )  # fmt: skip
    return Answer.of(response, started)


def new_client() -> Client:
    # The test client collects exceptions through a global signal: without this, a client
    # would re-raise the exception of a request running in another thread.
    return Client(raise_request_exception=False)


def summary(answers: list[Answer]) -> Counter[str]:
    return Counter(f"{answer.status} {answer.code or answer.replayed}" for answer in answers)


def test_simultaneous_duplicates_run_the_view_exactly_once(redis):
    note, key = new_note(), f"race-{uuid.uuid4()}"
    url = f"/race/count/lease/?note={note}&sleep=0.4"

    answers = in_threads(lambda _: post(new_client(), url, key))

    assert race_views.runs(note) == 1, summary(answers)
    firsts = [answer for answer in answers if answer.status == 201 and not answer.replayed]
    assert len(firsts) == 1, summary(answers)
    (first,) = firsts
    others = [answer for answer in answers if answer is not first]
    assert any(answer.status == 409 for answer in others), summary(answers)
    for answer in others:
        if answer.status == 409:
            assert_in_progress(answer)
        else:
            assert_replay_of(answer, first)
    assert_replay_of(post(new_client(), url, key), first)


def test_simultaneous_duplicates_with_wait_all_get_the_one_response(redis):
    note, key = new_note(), f"race-{uuid.uuid4()}"
    url = f"/race/count/wait/?note={note}&sleep=0.4"

    answers = in_threads(lambda _: post(new_client(), url, key))

    assert race_views.runs(note) == 1, summary(answers)
    assert all(answer.status == 201 for answer in answers), summary(answers)
    assert len({answer.content for answer in answers}) == 1
    assert sum(answer.replayed for answer in answers) == DUPLICATES - 1
    assert max(answer.elapsed for answer in answers) < 5, summary(answers)


def test_simultaneous_requests_of_two_tenants_with_one_key_each_run_once(redis, settings):
    settings.IDEMPOTENCY_SCOPE = "tests.views.tenant_scope"
    note, key = new_note(), f"race-{uuid.uuid4()}"
    url = f"/race/count/wait/?note={note}&sleep=0.3"
    tenants = ["acme", "globex"]

    answers = in_threads(lambda index: post(new_client(), url, key, X_Tenant=tenants[index % 2]))

    assert race_views.runs(note) == 2, summary(answers)
    by_tenant = {tenant: {a.run for a in answers[i::2]} for i, tenant in enumerate(tenants)}
    assert all(len(runs) == 1 for runs in by_tenant.values()), by_tenant
    assert by_tenant["acme"] != by_tenant["globex"]


def test_lease_mode_view_slower_than_its_lease_is_never_run_twice(redis, settings):
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(seconds=1)
    note, key = new_note(), f"slow-{uuid.uuid4()}"
    url = f"/race/count/lease/?note={note}&sleep=3"
    slow: list[Answer] = []
    thread = threading.Thread(target=lambda: slow.append(post(new_client(), url, key)))
    thread.start()
    store = redis.store()
    client = new_client()
    retries = []
    try:
        assert race_views.entered(note).wait(TIMEOUT), "the slow request never reached its view"
        entered_at = time.monotonic()
        for at in (1.5, 2.5):  # both well past the 1 s lease the request claimed
            time.sleep(max(0.0, entered_at + at - time.monotonic()))
            record = store.get(scope="anonymous", key=key)
            assert record.lease_remaining > 0, "the running request's lease was not renewed"
            retries.append(post(client, url, key))
    finally:
        thread.join(TIMEOUT)
    assert not thread.is_alive()

    for retry in retries:
        assert_in_progress(retry)
    (original,) = slow
    assert_fresh_run(original)
    assert race_views.runs(note) == 1
    assert_replay_of(post(client, url, key), original)
