"""A retry storm: 32 clients, 500 distinct operations, each retried up to 10 times.

docs/contract.md: a retry never runs an operation twice, whatever the timing. Each operation is sent
once and retried 1 to 10 times at random moments within 0.6 s of its first attempt; its view
sleeps up to 0.15 s, so many retries arrive while the first attempt still runs. The storm must
end with exactly one effect per operation, and every answer must be the original, an
identical replay of it, or a ``409`` (in progress); never a ``5xx``.

The database store's storm (half atomic mode, half lease mode) needs row locks and runs on
PostgreSQL and MariaDB; the cache store's storm runs wherever Redis does. The size comes from
``STORM_OPERATIONS``, ``STORM_CLIENTS`` and ``STORM_RETRIES`` (500, 32 and 10 by default). The
soak (``IDEMPOTENCY_SOAK_MINUTES``, see ``benchmarks/soak.py``) repeats storms for minutes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from django.db import connection

from tests import race_views
from tests.models import Charge
from tests.redis_support import delete_keys, new_prefix, raw_client, use_cache_store
from tests.storm_support import new_operations, run_storm

OPERATIONS = int(os.environ.get("STORM_OPERATIONS", "500"))
CLIENTS = int(os.environ.get("STORM_CLIENTS", "32"))
RETRIES = int(os.environ.get("STORM_RETRIES", "10"))
SOAK_MINUTES = float(os.environ.get("IDEMPOTENCY_SOAK_MINUTES", "0"))
SEED = int(os.environ.get("STORM_SEED", "6"))
STORM = {"max_retries": RETRIES, "spread": OPERATIONS / 60, "retry_window": 0.6}

row_locks = pytest.mark.skipif(
    not connection.features.has_select_for_update,
    reason=(
        "the database store's storm needs row locks: PostgreSQL or MariaDB (pytest-django's "
        "in-memory SQLite test database cannot be raced from several threads)"
    ),
)


def _database_storm(operations: int, seed: int) -> dict[str, Any]:
    ops = new_operations(operations, ["/race/atomic/", "/race/lease/"], max_sleep=0.15, seed=seed)
    result = run_storm(ops, clients=CLIENTS, seed=seed, **STORM)
    assert not result.problems(), (result.problems()[:10], result.summary())
    notes = [operation.note for operation in ops]
    charges = Charge.objects.filter(note__in=notes)
    assert charges.count() == operations, result.summary()
    assert set(charges.values_list("note", flat=True)) == set(notes)
    assert all(race_views.runs(note) == 1 for note in notes)
    return {"requests": result.requests, "seconds": result.seconds, "answers": result.summary()}


def _cache_storm(operations: int, seed: int) -> dict[str, Any]:
    ops = new_operations(operations, ["/race/count/lease/"], max_sleep=0.15, seed=seed)
    result = run_storm(ops, clients=CLIENTS, seed=seed, **STORM)
    assert not result.problems(), (result.problems()[:10], result.summary())
    assert sum(race_views.runs(operation.note) for operation in ops) == operations
    assert all(race_views.runs(operation.note) == 1 for operation in ops)
    return {"requests": result.requests, "seconds": result.seconds, "answers": result.summary()}


def _report(name: str, figures: dict[str, Any]) -> None:
    print(  # shown with -rP; the figures of docs/reliability.md
        f"{name} on {connection.vendor}: {OPERATIONS} operations, {CLIENTS} clients, "
        f"{figures['requests']} requests in {figures['seconds']:.1f} s: "
        f"{dict(figures['answers'])}"
    )


@row_locks
@pytest.mark.django_db(transaction=True)
def test_retry_storm_on_the_database_store_runs_each_operation_exactly_once():
    _report("database store storm", _database_storm(OPERATIONS, SEED))


@pytest.fixture
def cache_store(settings):
    prefix = new_prefix()
    alias = use_cache_store(settings, os.environ["REDIS_URL"], KEY_PREFIX=prefix)
    yield
    delete_keys(raw_client(alias), prefix)


@pytest.mark.redis
@pytest.mark.usefixtures("cache_store")
def test_retry_storm_on_the_cache_store_runs_each_operation_exactly_once():
    _report("cache store storm", _cache_storm(OPERATIONS, SEED))


# -- The soak: storms back to back for minutes (opt-in) --------------------------------------

soak = pytest.mark.skipif(
    not SOAK_MINUTES, reason="the soak is opt-in: python benchmarks/soak.py --minutes 5"
)


def _soak(storm: Any) -> None:
    ends = time.monotonic() + SOAK_MINUTES * 60
    rounds = requests = 0
    while time.monotonic() < ends:
        figures = storm(OPERATIONS, SEED + rounds)
        rounds += 1
        requests += figures["requests"]
        _report(f"soak round {rounds}", figures)
    print(f"soak: {rounds} storms, {rounds * OPERATIONS} operations, {requests} requests, OK")


@soak
@row_locks
@pytest.mark.django_db(transaction=True)
def test_soak_on_the_database_store():
    _soak(_database_storm)


@soak
@pytest.mark.redis
@pytest.mark.usefixtures("cache_store")
def test_soak_on_the_cache_store():
    _soak(_cache_storm)
