"""The replay cache (issue #4): completed responses of the database store kept in Redis.

Every test runs the database store with ``IDEMPOTENCY_REPLAY_CACHE = "redis"`` (the django-redis
cache that ``tests/settings.py`` defines when ``REDIS_URL`` is set) against the suite's database.
``transaction=True``: the cache is written by ``transaction.on_commit()``, which a test wrapped
in a transaction of its own would never reach.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import timedelta

import pytest
from django.core.cache import caches
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models.functions import Now
from django.http import JsonResponse
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.utils.http import parse_http_date

from django_idempotency import replay_cache
from django_idempotency.conf import get_store
from django_idempotency.decorators import idempotent
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import ClaimRequest
from tests import race_views
from tests.assertions import assert_problem
from tests.models import Charge
from tests.views import HAS_DRF, LARGE_BODY_SIZE, RUNS, VIEW_DATE

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

BODY = {"amount": 7}
ANONYMOUS = "anonymous"

needs_drf = pytest.mark.skipif(not HAS_DRF, reason="DRF is not installed (tox minimal)")

# Anonymous views whose own work is one INSERT: with no session and no authentication to look
# up, a replay served from the cache must send no SQL at all.
VIEWS = [
    pytest.param("/race/atomic/", id="decorator-atomic"),
    pytest.param("/race/lease/", id="decorator-lease"),
    pytest.param("/race/async/", id="decorator-async"),
    pytest.param("/race/drf/", id="mixin", marks=needs_drf),
]


@pytest.fixture(autouse=True)
def cache(settings):
    """The replay cache on the ``redis`` alias, emptied of replay entries around each test.

    Only this package's replay entries are deleted (never the whole Redis database), so the
    tests can share a Redis server with anything else.
    """
    settings.IDEMPOTENCY_REPLAY_CACHE = "redis"
    redis = caches["redis"]
    redis.delete_pattern(replay_cache.PREFIX + "*")
    yield redis
    redis.delete_pattern(replay_cache.PREFIX + "*")


def cached_entries(cache) -> list[str]:
    return cache.keys(replay_cache.PREFIX + "*")


def post(url: str, key: str, *, body=BODY, client: Client | None = None, **headers):
    return (client or Client(raise_request_exception=False)).post(
        url,
        body,
        content_type="application/json",
        headers={"Idempotency-Key": key, **headers},
    )


def new_key() -> str:
    return f"replay-{uuid.uuid4()}"


def race_url(base: str) -> str:
    return f"{base}?note={uuid.uuid4().hex[:12]}"


def expires_in(response) -> float:
    """Seconds from now until the ``Idempotency-Key-Expires`` the response carries."""
    return parse_http_date(response["Idempotency-Key-Expires"]) - time.time()


def sql(captured: CaptureQueriesContext) -> str:
    return "\n".join(f"  {query['sql'][:160]}" for query in captured.captured_queries)


# -- Replays from the cache -----------------------------------------------------------------


@pytest.mark.parametrize("base", VIEWS)
def test_replay_is_the_stored_response_byte_for_byte_and_costs_no_query(base, cache):
    url, key = race_url(base), new_key()
    first = post(url, key)
    assert first.status_code == 201
    assert cache.get(replay_cache.cache_key(ANONYMOUS, key)) is not None

    with CaptureQueriesContext(connection) as captured:
        replay = post(url, key)

    assert captured.captured_queries == [], f"a cached replay sent SQL:\n{sql(captured)}"
    assert replay.status_code == first.status_code
    assert replay.content == first.content
    assert replay["Content-Type"] == first["Content-Type"]
    assert replay["Location"] == first["Location"]
    assert replay["Idempotent-Replayed"] == "true"
    assert race_views.runs(url.split("note=")[1]) == 1


def test_cached_replay_keeps_the_views_headers_and_drops_the_ones_never_stored(cache):
    key = new_key()
    first = post("/sync/", key)
    assert first.status_code == 201

    with CaptureQueriesContext(connection) as captured:
        replay = post("/sync/", key)

    assert captured.captured_queries == []
    assert replay.content == first.content
    for name in ("Location", "ETag", "X-Custom", "Content-Type"):
        assert replay[name] == first[name]
    assert not replay.has_header("Keep-Alive")
    assert replay.get("Date") != VIEW_DATE
    assert "session_hint" not in replay.cookies
    assert RUNS == ["/sync/"]


def test_replay_of_a_4xx_response_is_cached_too(cache):
    key = new_key()
    first = post("/sync/?behaviour=400", key)
    assert first.status_code == 400

    with CaptureQueriesContext(connection) as captured:
        replay = post("/sync/?behaviour=400", key)

    assert captured.captured_queries == []
    assert (replay.status_code, replay.content) == (400, first.content)
    assert replay["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("base", VIEWS)
def test_different_body_with_the_same_key_is_refused_from_the_cache(base):
    url, key = race_url(base), new_key()
    assert post(url, key).status_code == 201

    with CaptureQueriesContext(connection) as captured:
        response = post(url, key, body={"amount": 8})

    assert_problem(response, 422, "idempotency_key_mismatch")
    assert captured.captured_queries == []


def test_the_cache_is_scoped_like_the_store(alice, bob, cache):
    key = new_key()
    alices, bobs = Client(), Client()
    alices.force_login(alice)
    bobs.force_login(bob)

    first = post("/sync/", key, client=alices)
    other = post("/sync/", key, client=bobs)

    assert (first.status_code, other.status_code) == (201, 201)
    assert not other.has_header("Idempotent-Replayed")
    assert json.loads(first.content)["id"] != json.loads(other.content)["id"]
    assert len(cached_entries(cache)) == 2
    assert post("/sync/", key, client=alices).content == first.content
    assert post("/sync/", key, client=bobs).content == other.content
    assert RUNS == ["/sync/", "/sync/"]


# -- Misses, lifetimes and what never gets cached -------------------------------------------


@pytest.mark.parametrize("base", VIEWS)
def test_cache_miss_falls_back_to_the_database_and_still_replays(base, cache):
    url, key = race_url(base), new_key()
    first = post(url, key)
    assert cache.delete(replay_cache.cache_key(ANONYMOUS, key))

    with CaptureQueriesContext(connection) as captured:
        replay = post(url, key)

    assert captured.captured_queries, "the miss was not answered from the database"
    assert (replay.status_code, replay.content) == (201, first.content)
    assert replay["Location"] == first["Location"]
    assert replay["Idempotent-Replayed"] == "true"
    assert race_views.runs(url.split("note=")[1]) == 1


def test_replay_after_a_miss_refills_the_cache_for_the_rest_of_the_keys_life(cache):
    url, key = race_url("/race/atomic/"), new_key()
    first = post(url, key)
    name = replay_cache.cache_key(ANONYMOUS, key)
    cache.delete(name)  # as after a Redis restart or an eviction
    IdempotencyKey.objects.update(expires_at=Now() + timedelta(minutes=10))

    assert post(url, key).content == first.content  # from the database
    with CaptureQueriesContext(connection) as captured:
        replay = post(url, key)

    assert captured.captured_queries == [], f"the refilled cache was not used:\n{sql(captured)}"
    assert (replay.status_code, replay.content) == (201, first.content)
    assert 9 * 60_000 < cache.pttl(name) <= 10 * 60_000


@pytest.mark.parametrize("base", VIEWS)
def test_cached_replay_carries_the_keys_expiry_as_the_database_holds_it(base, cache):
    url, key = race_url(base), new_key()
    first = post(url, key)
    row = IdempotencyKey.objects.get(key=key)

    with CaptureQueriesContext(connection) as captured:
        replay = post(url, key)

    assert captured.captured_queries == []
    assert replay["Idempotent-Replayed"] == "true"
    expires_at = row.expires_at.timestamp()  # this host's database: its clock is the app's
    for answer in (first, replay):
        assert abs(parse_http_date(answer["Idempotency-Key-Expires"]) - expires_at) <= 2
    stored_headers = cache.get(replay_cache.cache_key(ANONYMOUS, key))[3]
    assert "Idempotency-Key-Expires" not in dict(stored_headers)


def test_replay_after_a_miss_and_from_the_refilled_copy_carry_the_databases_expiry(cache):
    url, key = race_url("/race/atomic/"), new_key()
    post(url, key)
    cache.delete(replay_cache.cache_key(ANONYMOUS, key))
    IdempotencyKey.objects.update(expires_at=Now() + timedelta(minutes=10))

    from_database = post(url, key)
    with CaptureQueriesContext(connection) as captured:
        from_cache = post(url, key)

    assert captured.captured_queries == []
    for replay in (from_database, from_cache):
        assert replay["Idempotent-Replayed"] == "true"
        assert 600 - 3 <= expires_in(replay) <= 600 + 1


def test_entry_of_an_older_layout_is_a_miss_answered_by_the_database(cache):
    url, key = race_url("/race/atomic/"), new_key()
    first = post(url, key)
    name = replay_cache.cache_key(ANONYMOUS, key)
    entry = cache.get(name)
    assert entry[0] == replay_cache.VERSION
    cache.set(name, [1, *entry[1:5]], timeout=600)  # version 1: no expiry

    with CaptureQueriesContext(connection) as captured:
        replay = post(url, key)

    assert captured.captured_queries, "the old entry was not read as a miss"
    assert (replay.status_code, replay.content) == (201, first.content)
    assert 86_400 - 60 <= expires_in(replay) <= 86_400 + 1
    assert cache.get(name)[0] == replay_cache.VERSION  # refilled in the new layout


@pytest.mark.parametrize(
    "serializer",
    [
        "django_redis.serializers.json.JSONSerializer",
        "django_redis.serializers.pickle.PickleSerializer",
    ],
)
def test_the_replay_cache_works_with_django_redis_serializers(settings, serializer):
    settings.CACHES = {
        **settings.CACHES,
        "replays": {
            **settings.CACHES["redis"],
            "OPTIONS": {"SERIALIZER": serializer},
        },
    }
    settings.IDEMPOTENCY_REPLAY_CACHE = "replays"
    url, key = race_url("/race/atomic/"), new_key()
    first = post(url, key)

    with CaptureQueriesContext(connection) as captured:
        replay = post(url, key)

    assert captured.captured_queries == []
    assert replay.content == first.content
    assert replay["Idempotent-Replayed"] == "true"
    caches["replays"].delete(replay_cache.cache_key(ANONYMOUS, key))


@pytest.mark.parametrize(
    ("url", "ttl"),
    [
        pytest.param("/sync/", timedelta(hours=24), id="default-ttl"),
        pytest.param("/sync/ttl/", timedelta(days=2), id="per-view-ttl"),
        pytest.param("/sync/lease/ttl/", timedelta(days=2), id="lease-per-view-ttl"),
        pytest.param("/async/ttl/", timedelta(days=2), id="async-per-view-ttl"),
    ],
)
def test_cache_entry_never_outlives_the_keys_ttl(url, ttl, cache):
    key = new_key()
    assert post(url, key).status_code == 201

    remaining_ms = cache.pttl(replay_cache.cache_key(ANONYMOUS, key))

    ttl_ms = ttl.total_seconds() * 1000
    assert ttl_ms - 60_000 < remaining_ms <= ttl_ms


def test_cache_entry_follows_the_ttl_setting(settings, cache):
    settings.IDEMPOTENCY_TTL = timedelta(minutes=5)
    key = new_key()
    assert post("/sync/", key).status_code == 201

    assert 0 < cache.pttl(replay_cache.cache_key(ANONYMOUS, key)) <= 5 * 60 * 1000


@pytest.mark.parametrize("view", ["sync", "sync/lease", "async"])
@pytest.mark.parametrize("behaviour", ["raise", "500", "stream", "large"])
def test_view_that_raises_fails_streams_or_is_too_large_caches_nothing(
    view, behaviour, settings, cache
):
    settings.IDEMPOTENCY_MAX_RESPONSE_SIZE = LARGE_BODY_SIZE - 1
    key = new_key()

    post(f"/{view}/?behaviour={behaviour}", key)

    assert cached_entries(cache) == []


def test_stored_5xx_response_is_cached_when_server_errors_are_stored(settings, cache):
    settings.IDEMPOTENCY_STORE_SERVER_ERRORS = True
    key = new_key()
    first = post("/sync/?behaviour=500", key)

    with CaptureQueriesContext(connection) as captured:
        replay = post("/sync/?behaviour=500", key)

    assert captured.captured_queries == []
    assert (replay.status_code, replay.content) == (500, first.content)


def test_response_completed_without_a_body_is_not_cached_and_still_refused(settings, cache):
    settings.IDEMPOTENCY_MAX_RESPONSE_SIZE = LARGE_BODY_SIZE - 1
    key = new_key()
    assert post("/sync/?behaviour=large", key).status_code == 201

    retry = post("/sync/?behaviour=large", key)

    assert cached_entries(cache) == []
    assert_problem(retry, 409, "idempotency_response_not_stored")
    assert RUNS == ["/sync/"]


# -- The cache is written only after commit -------------------------------------------------


def charge_view(request):
    charge = Charge.objects.create(amount=json.loads(request.body)["amount"])
    return JsonResponse({"id": charge.pk}, status=201)


def charge_then_fail_view(request):
    charge_view(request)
    raise RuntimeError("the view failed after writing")


def factory_post(key: str):
    return RequestFactory().post(
        "/charges/", BODY, content_type="application/json", headers={"Idempotency-Key": key}
    )


class OuterRollback(Exception):
    pass


def test_atomic_mode_caches_nothing_when_the_view_raises_after_writing(cache):
    view = idempotent(charge_then_fail_view)
    key = new_key()

    with pytest.raises(RuntimeError):
        view(factory_post(key))

    assert cached_entries(cache) == []
    assert Charge.objects.count() == 0
    assert not IdempotencyKey.objects.exists()


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "lease"])
def test_nothing_is_cached_when_an_outer_transaction_rolls_back(atomic, cache):
    # What ATOMIC_REQUESTS does when something after the view fails: the whole request's
    # transaction, stored response included, is rolled back.
    view = idempotent(atomic=atomic)(charge_view)
    key = new_key()

    seen = []

    def request_then_fail():
        with transaction.atomic():
            seen.append(view(factory_post(key)).status_code)
            seen.append(cached_entries(cache))
            raise OuterRollback

    with pytest.raises(OuterRollback):
        request_then_fail()

    assert seen == [201, []]  # not cached before the commit...
    assert cached_entries(cache) == []  # ...and never, as there was none
    assert not IdempotencyKey.objects.exists()
    assert Charge.objects.count() == 0


def test_cache_is_written_when_the_outer_transaction_commits(cache):
    view = idempotent(charge_view)
    key = new_key()

    with transaction.atomic():
        first = view(factory_post(key))
        assert cached_entries(cache) == []

    assert cache.get(replay_cache.cache_key(ANONYMOUS, key)) is not None
    with CaptureQueriesContext(connection) as captured:
        replay = view(factory_post(key))
    assert captured.captured_queries == []
    assert replay.content == first.content


def test_cache_is_written_after_the_commit_of_atomic_requests(monkeypatch, cache):
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    url, key = race_url("/race/atomic/"), new_key()
    first = post(url, key)
    assert cache.get(replay_cache.cache_key(ANONYMOUS, key)) is not None

    with CaptureQueriesContext(connection) as captured:
        replay = post(url, key)

    # Only the request's own transaction, which ATOMIC_REQUESTS opens around every view.
    statements = [query["sql"] for query in captured.captured_queries]
    assert all(sql.startswith(("BEGIN", "COMMIT")) for sql in statements), sql(captured)
    assert replay.content == first.content


# -- Expiry, takeover and purge --------------------------------------------------------------


def test_expired_key_taken_over_by_a_new_request_never_replays_the_old_response(settings, cache):
    settings.IDEMPOTENCY_TTL = timedelta(seconds=0.5)
    url, key = race_url("/race/atomic/"), new_key()
    first = post(url, key)
    time.sleep(0.6)  # the key and its cached copy expire together

    second = post(url, key)
    replay = post(url, key)

    assert (second.status_code, replay.status_code) == (201, 201)
    assert not second.has_header("Idempotent-Replayed")
    assert second.content != first.content
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == second.content
    assert race_views.runs(url.split("note=")[1]) == 2


@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_takeover_of_an_expired_completed_key_forgets_its_cached_copy(mode, cache):
    key = new_key()
    post("/sync/", key)
    name = replay_cache.cache_key(ANONYMOUS, key)
    assert cache.get(name) is not None
    IdempotencyKey.objects.filter(key=key).update(expires_at=Now() - timedelta(seconds=1))

    # The store's own takeover, as a request that found no cached copy would reach it.
    claim = ClaimRequest(
        scope=ANONYMOUS,
        key=key,
        fingerprint="another request",
        method="POST",
        path="/sync/",
        token=uuid.uuid4().hex,
        ttl=timedelta(hours=1),
    )
    store = get_store()
    if mode == "lease":
        record = store.claim(claim, lease=timedelta(seconds=30), insert=False)
    else:
        with store.lock(claim, insert=False) as record:
            pass

    assert record.owner_token == claim.token
    assert cache.get(name) is None


def expire_and_cache(cache) -> list[str]:
    keys = [new_key() for _ in range(3)]
    for key in keys:
        assert post("/sync/", key).status_code == 201
    IdempotencyKey.objects.filter(key__in=keys[:2]).update(expires_at=Now() - timedelta(seconds=1))
    assert len(cached_entries(cache)) == 3
    return keys


def test_purge_forgets_the_cached_copies_of_the_keys_it_deletes(cache):
    expired_a, expired_b, live = expire_and_cache(cache)

    assert IdempotencyKey.objects.purge() == 2

    assert cache.get(replay_cache.cache_key(ANONYMOUS, expired_a)) is None
    assert cache.get(replay_cache.cache_key(ANONYMOUS, expired_b)) is None
    assert cache.get(replay_cache.cache_key(ANONYMOUS, live)) is not None


def test_purge_command_forgets_the_cached_copies_of_the_keys_it_deletes(cache):
    expired_a, expired_b, live = expire_and_cache(cache)

    call_command("purge_idempotency_keys", verbosity=0)

    assert cache.get(replay_cache.cache_key(ANONYMOUS, expired_a)) is None
    assert cache.get(replay_cache.cache_key(ANONYMOUS, expired_b)) is None
    assert cache.get(replay_cache.cache_key(ANONYMOUS, live)) is not None


def test_purge_dry_run_keeps_the_cached_copies(cache):
    expire_and_cache(cache)

    call_command("purge_idempotency_keys", dry_run=True, verbosity=0)

    assert len(cached_entries(cache)) == 3


# -- An unreachable cache ---------------------------------------------------------------------


@pytest.fixture
def unreachable_cache(settings):
    """Point the replay cache at a Redis that is not there (nothing listens on port 1)."""
    settings.CACHES = {
        **settings.CACHES,
        "unreachable": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2},
        },
    }
    settings.IDEMPOTENCY_REPLAY_CACHE = "unreachable"


@pytest.mark.parametrize("base", VIEWS)
def test_unreachable_cache_leaves_the_database_to_answer_with_a_warning(
    base, unreachable_cache, caplog
):
    url, key = race_url(base), new_key()

    with caplog.at_level(logging.WARNING, logger="django_idempotency"):
        first = post(url, key)
        replay = post(url, key)
        mismatch = post(url, key, body={"amount": 8})

    assert first.status_code == 201
    assert (replay.status_code, replay.content) == (201, first.content)
    assert replay["Idempotent-Replayed"] == "true"
    assert_problem(mismatch, 422, "idempotency_key_mismatch")
    assert race_views.runs(url.split("note=")[1]) == 1
    messages = [record.getMessage() for record in caplog.records]
    assert "The replay cache could not be written; replays will use the store." in messages
    assert "The replay cache could not be read; answering from the store." in messages
    assert all(record.levelno == logging.WARNING for record in caplog.records)


def test_unreachable_cache_does_not_stop_a_purge(unreachable_cache, caplog):
    post("/sync/", key := new_key())
    IdempotencyKey.objects.filter(key=key).update(expires_at=Now() - timedelta(seconds=1))

    with caplog.at_level(logging.WARNING, logger="django_idempotency"):
        assert IdempotencyKey.objects.purge() == 1

    assert not IdempotencyKey.objects.exists()
