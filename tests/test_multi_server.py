"""The retry storm across three gunicorn instances behind a real HAProxy (docs/scaling.md).

docs/contract.md's promise does not depend on which app server a retry reaches: three
gunicorn instances on their own ports (two sync workers each) share one store, and HAProxy
balances round robin with no stickiness, so the retries of a key land on other instances than
its first attempt. The 32-client storm of ``tests/test_retry_storm.py`` sent through HAProxy
must end with exactly one effect per operation and never a ``5xx``.

Two stores: the database store on the suite's test database, which the instances share (half
atomic mode, half lease mode; it needs row locks, so PostgreSQL or MariaDB), and the
``CacheStore`` on ``REDIS_URL`` (lease mode, the effects counted in Redis).

Marked ``topology``: deselected unless ``IDEMPOTENCY_TOPOLOGIES=1``, run by
``scripts/topologies.sh`` (about 20 s a store), not by the default suite or CI.
``benchmarks/multi_server.py`` measures the same storm, and one with an instance killed.
Needs HAProxy (``scripts/services.sh`` installs it): skipped without it, failed when
``IDEMPOTENCY_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.core.cache.backends.base import default_key_func
from django.db import connection

from tests.models import Charge
from tests.multi_server_support import Topology, haproxy_binary, percentile, run_http_storm
from tests.redis_support import delete_keys, new_prefix, services_required
from tests.reliability_support import worker_database_url
from tests.storm_support import new_operations

pytestmark = pytest.mark.topology

OPERATIONS = int(os.environ.get("MULTI_SERVER_OPERATIONS", "300"))
CLIENTS = 32
SEED = 16

row_locks = pytest.mark.skipif(
    not connection.features.has_select_for_update,
    reason=(
        "the instances share the test database and race on its rows: PostgreSQL or MariaDB "
        "(pytest-django's in-memory SQLite cannot be shared between processes)"
    ),
)


def _haproxy() -> str:
    binary = haproxy_binary()
    if binary is None:
        if services_required():
            pytest.fail(
                "needs HAProxy (apt-get install haproxy), and IDEMPOTENCY_REQUIRE_SERVICES is set"
            )
        pytest.skip("needs HAProxy: apt-get install haproxy (or bash scripts/services.sh)")
    return binary


@contextmanager
def _topology(directory: Path, **env: str) -> Iterator[Topology]:
    topology = Topology(directory, binary=_haproxy(), **env)
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="module")
def database_topology(tmp_path_factory, django_db_setup) -> Iterator[Topology]:
    if not connection.features.has_select_for_update:
        pytest.skip("needs PostgreSQL or MariaDB")
    directory = tmp_path_factory.mktemp("multi-server-db")
    with _topology(directory, RELIABILITY_DATABASE_URL=worker_database_url()) as topology:
        yield topology


@pytest.fixture(scope="module")
def cache_topology(tmp_path_factory) -> Iterator[tuple[Topology, Any, str]]:
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        pytest.skip("needs Redis (REDIS_URL)")  # pragma: no cover - the redis marker skips first
    import redis  # not at the top: the tox "minimal" env has no redis-py

    prefix = new_prefix()
    client = redis.Redis.from_url(redis_url)
    directory = tmp_path_factory.mktemp("multi-server-cache")
    try:
        with _topology(
            directory, RELIABILITY_STORE="cache", RELIABILITY_KEY_PREFIX=prefix
        ) as topology:
            yield topology, client, prefix
    finally:
        delete_keys(client, prefix)
        client.close()


def _storm_through_haproxy(
    topology: Topology, urls: list[str], effects: Callable[[list[str]], Counter[str]]
) -> None:
    operations = new_operations(OPERATIONS, urls, max_sleep=0.15, seed=SEED)
    result = run_http_storm(
        topology.port,
        operations,
        clients=CLIENTS,
        max_retries=10,
        spread=OPERATIONS / 60,
        retry_window=0.6,
        seed=SEED,
    )

    assert not result.problems(), (result.problems()[:10], result.summary())
    assert not result.dropped, result.dropped
    assert result.server_errors() == 0, result.summary()
    notes = [operation.note for operation in operations]
    assert effects(notes) == Counter(dict.fromkeys(notes, 1))
    # Round robin without stickiness: every instance served, retries moved between them.
    assert set(result.served()) == set(topology.servers), result.served()
    assert result.moved_keys() > OPERATIONS / 2, result.moved_keys()
    moved, retries = result.moved_retries()
    assert moved > retries / 2, (moved, retries)
    latencies = result.latencies()
    print(  # shown with -rP
        f"{OPERATIONS} operations, {CLIENTS} clients, "
        f"{result.requests} requests in {result.seconds:.1f} s "
        f"({result.requests / result.seconds:.0f}/s), "
        f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, "
        f"{moved} of {retries} retries answered by another instance than their first attempt "
        f"({result.moved_keys()} of {OPERATIONS} keys), "
        f"served {dict(sorted(result.served().items()))}: "
        f"{dict(result.summary())}"
    )


@row_locks
@pytest.mark.django_db(transaction=True)
def test_retry_storm_across_three_instances_on_the_database_store_runs_each_operation_once(
    database_topology,
):
    def effects(notes: list[str]) -> Counter[str]:
        return Counter(Charge.objects.filter(note__in=notes).values_list("note", flat=True))

    print(f"database store on {connection.vendor}: ", end="")
    _storm_through_haproxy(database_topology, ["/effect/atomic/", "/effect/lease/"], effects)


@pytest.mark.redis
def test_retry_storm_across_three_instances_on_the_cache_store_runs_each_operation_once(
    cache_topology,
):
    topology, client, prefix = cache_topology

    def effects(notes: list[str]) -> Counter[str]:
        keys = [default_key_func(f"effects:{note}", prefix, 1) for note in notes]
        counts = zip(notes, client.mget(keys), strict=True)
        return Counter({note: int(count) for note, count in counts if count is not None})

    print("cache store: ", end="")
    _storm_through_haproxy(topology, ["/count/lease/"], effects)
