"""Workers of a real gunicorn killed with SIGKILL in the middle of a view, and a client retrying.

docs/modes.md (the atomic and the lease mode): a dead worker's key is freed (by the database in
the atomic mode, by its lease in the lease mode), nothing it half-wrote survives in the atomic
mode, and after the client's retries the effect exists exactly once. The worker is a process of
a real gunicorn (two sync workers, ``tests/reliability_views.py``), killed while it is held
inside the view; its client sees the connection drop and retries every 0.1 s, as a mobile app
would, until it gets an answer that is neither a dropped connection, a 5xx nor a 409. The master
forks a new worker, which serves the retries.

The database store's crashes need a database the gunicorn workers share with the test, with
row locks: they run on PostgreSQL and MariaDB and are skipped on SQLite. The cache store's run
everywhere Redis does.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.cache.backends.base import default_key_func
from django.db import connection

from django_idempotency.models import IdempotencyKey
from tests.models import Charge
from tests.redis_support import Answer, assert_fresh_run, assert_replay_of, delete_keys, new_prefix
from tests.reliability_support import Outcome, Server, retry_until_done, worker_database_url
from tests.reliability_views import provider_ledger

LEASE_SECONDS = 2.0
CRASHES_PER_CASE = 2
#: How long a dead worker's key may keep a retry out, beyond its lease: the client retries
#: every 0.1 s, and a killed worker's lease was renewed up to a third of a lease before it died.
SLACK = 1.0

row_locks = pytest.mark.skipif(
    not connection.features.has_select_for_update,
    reason="needs a database the gunicorn workers share, with row locks: PostgreSQL or MariaDB",
)

#: Figures for the closing note: crashes survived per case.
SURVIVED: dict[str, int] = {}


def _post_in_background(server: Server, url: str, key: str) -> tuple[threading.Thread, Outcome]:
    outcome = Outcome()
    thread = threading.Thread(
        target=retry_until_done,
        args=(lambda: server.post(url, key),),
        kwargs={"outcome": outcome, "deadline": 30},
        daemon=True,
    )
    thread.start()
    return thread, outcome


def crash_and_retry(server: Server, url: str, note: str, key: str, where: str) -> dict[str, Any]:
    """Kill the worker running the first request ``where`` its effect is; retry until done."""
    server.hold(note, where)
    thread, outcome = _post_in_background(server, url, key)
    pid = server.wait_inside(note)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    server.release(note)
    thread.join(40)
    assert not thread.is_alive(), "the client never got an answer"
    final = outcome.final
    assert_fresh_run(final)
    assert final.headers["X-Served-By"] != str(pid)
    assert outcome.done_at is not None
    dropped = [answer for answer in outcome.answers if isinstance(answer, str)]
    assert dropped, f"the first request was not cut off by the kill: {outcome.answers}"
    statuses = {answer.status for answer in outcome.answers if isinstance(answer, Answer)}
    assert statuses <= {201, 409}, outcome.answers  # never a 5xx
    # The key is free again, and the retry's answer is replayed from now on.
    assert_replay_of(server.post(url, key), final)
    return {"stuck": outcome.done_at - killed_at, "answers": outcome.answers, "final": final}


# -- The database store ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def database_server(tmp_path_factory, django_db_setup) -> Iterator[Server]:
    if not connection.features.has_select_for_update:
        pytest.skip("needs PostgreSQL or MariaDB")
    server = Server(
        tmp_path_factory.mktemp("crashes-db"),
        RELIABILITY_DATABASE_URL=worker_database_url(),
        RELIABILITY_LOCK_TTL=str(LEASE_SECONDS),
    )
    try:
        yield server
    finally:
        server.stop()


@row_locks
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("mode", "where"),
    [
        pytest.param("atomic", "before", id="atomic-before-effect"),
        pytest.param("atomic", "after", id="atomic-after-effect"),
        pytest.param("lease", "before", id="lease-before-effect"),
    ],
)
def test_worker_killed_inside_the_view_leaves_one_effect_after_the_retries(
    database_server, mode, where
):
    url_base = f"/effect/{mode}/"
    for _ in range(CRASHES_PER_CASE):
        note, key = uuid.uuid4().hex[:12], f"crash-{uuid.uuid4()}"
        url = f"{url_base}?note={note}"

        result = crash_and_retry(database_server, url, note, key, where)

        # Atomic: the dead worker's transaction rolled back with its effect, and its row lock
        # went with its connection, so the retry ran at once. Lease: the retry ran once the
        # lease had passed, and not much later.
        assert Charge.objects.filter(note=note).count() == 1
        row = IdempotencyKey.objects.get(key=key)
        assert row.state == IdempotencyKey.State.COMPLETED
        assert row.response_body == result["final"].content
        bound = 2.0 if mode == "atomic" else LEASE_SECONDS + SLACK
        assert result["stuck"] < bound, result
        if mode == "lease":
            assert any(
                isinstance(answer, Answer) and answer.status == 409 for answer in result["answers"]
            ), "the dead worker's live lease kept nobody out"
        SURVIVED[f"database-{mode}-{where}"] = SURVIVED.get(f"database-{mode}-{where}", 0) + 1


@row_locks
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("where", "provider_calls"),
    [
        pytest.param("after-order", 1, id="between-order-and-payment"),
        pytest.param("after-provider-call", 2, id="after-the-providers-charge"),
    ],
)
def test_phased_view_killed_between_phases_resumes_without_repeating_its_first_phase(
    database_server, where, provider_calls
):
    """Issue 8: a retry after the kill resumes after the last recovery point.

    Killed after the order phase committed, the retry creates no second order and calls the
    provider once. Killed after the provider charged but before that phase's recovery point was
    saved, the retry calls the provider again with the same derived key, and the provider,
    which deduplicates by key, charges once.
    """
    for _ in range(CRASHES_PER_CASE):
        note, key = uuid.uuid4().hex[:12], f"phased-{uuid.uuid4()}"

        result = crash_and_retry(database_server, f"/phased/?note={note}", note, key, where)

        body = json.loads(result["final"].content)
        assert body["resumed_after"] == "order"
        assert Charge.objects.filter(note=f"{note}:order").count() == 1
        assert Charge.objects.filter(note=f"{note}:receipt").count() == 1
        calls = provider_ledger(database_server.directory)[body["payment_key"]]
        assert len(calls) == provider_calls
        assert set(calls) == {body["payment"]["provider_charge"]}  # one charge
        row = IdempotencyKey.objects.get(key=key)
        assert [name for name, _ in row.recovery_points] == ["order", "payment", "receipt"]
        assert result["stuck"] < LEASE_SECONDS + SLACK, result
        SURVIVED[f"phased-{where}"] = SURVIVED.get(f"phased-{where}", 0) + 1


# -- The cache store -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory) -> Iterator[tuple[Server, Any, str]]:
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        pytest.skip("needs Redis (REDIS_URL)")  # pragma: no cover - the redis marker skips first
    import redis  # not at the top: the tox "minimal" env has no redis-py

    prefix = new_prefix()
    client = redis.Redis.from_url(redis_url)
    server = Server(
        tmp_path_factory.mktemp("crashes-cache"),
        RELIABILITY_STORE="cache",
        RELIABILITY_KEY_PREFIX=prefix,
        RELIABILITY_LOCK_TTL=str(LEASE_SECONDS),
    )
    try:
        yield server, client, prefix
    finally:
        server.stop()
        delete_keys(client, prefix)
        client.close()


def _effects(client: Any, prefix: str, note: str) -> int:
    return int(client.get(default_key_func(f"effects:{note}", prefix, 1)) or 0)


@pytest.mark.redis
def test_cache_store_worker_killed_before_its_effect_leaves_one_effect(cache_server):
    server, client, prefix = cache_server
    for _ in range(CRASHES_PER_CASE):
        note, key = uuid.uuid4().hex[:12], f"crash-{uuid.uuid4()}"
        url = f"/count/lease/?note={note}"

        result = crash_and_retry(server, url, note, key, "before")

        assert _effects(client, prefix, note) == 1
        assert result["stuck"] < LEASE_SECONDS + SLACK, result
        assert any(
            isinstance(answer, Answer) and answer.status == 409 for answer in result["answers"]
        ), "the dead worker's live lease kept nobody out"
        SURVIVED["cache-lease-before"] = SURVIVED.get("cache-lease-before", 0) + 1


@pytest.mark.redis
def test_cache_store_worker_killed_after_its_effect_runs_the_view_again_once(cache_server):
    # The documented limit of the lease mode (docs/modes.md, "Trade-offs"; docs/reliability.md):
    # an effect outside the store's transaction cannot roll back. The retry runs the view again
    # once the lease passes, exactly once, and the key is never stuck longer than that.
    server, client, prefix = cache_server
    note, key = uuid.uuid4().hex[:12], f"crash-{uuid.uuid4()}"
    url = f"/count/lease/?note={note}"

    result = crash_and_retry(server, url, note, key, "after")

    assert _effects(client, prefix, note) == 2
    assert result["stuck"] < LEASE_SECONDS + SLACK, result
    SURVIVED["cache-lease-after"] = SURVIVED.get("cache-lease-after", 0) + 1


@pytest.mark.redis
def test_gunicorn_keeps_serving_after_its_workers_were_killed(cache_server, tmp_path):
    server, client, prefix = cache_server
    note = uuid.uuid4().hex[:12]
    answers = [server.post(f"/count/lease/?note={note}", f"after-{uuid.uuid4()}") for _ in range(4)]
    assert [answer.status for answer in answers] == [201] * 4
    assert _effects(client, prefix, note) == 4
    assert Path(server.log).exists()
