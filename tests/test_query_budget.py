"""Query budgets (issue #2): a replay costs one query; a first execution on top of the view's
own, in the atomic mode: 3 on PostgreSQL (read, advisory locks with a second read, insert the
completed row: issue #16), 5 on MariaDB (read, GET_LOCK, a second read, insert the completed
row, release the locks; one commit), 4 with row claims (read, insert, lock, store: two
commits), 3 on SQLite; 3 in the lease mode (read, insert, store). Each is measured against an
undecorated twin of the same view. With
the replay cache (issue #4, ``IDEMPOTENCY_REPLAY_CACHE``), a replay costs no query at all. The
figures are docs/modes.md's "What each request costs": exact, so a change shows up here.

Asserted on whichever database the suite runs on: SQLite, PostgreSQL and MariaDB, with each of
the database store's statement strategies (the ``statements`` fixture): the figures are the
same whether the statements are plain SQL or the ORM's, but for the advisory claims, which need
the plain SQL (with the ORM, PostgreSQL and MariaDB claim with rows).

Transaction boundaries (``BEGIN``, ``COMMIT``, ``ROLLBACK``), which Django logs as queries,
are counted separately: the atomic mode needs one transaction around the view by design
(docs/modes.md, "The atomic mode"), so its boundaries are the price of the mode rather than
queries the package chose to send. Every other statement counts, savepoints included.
"""

from __future__ import annotations

import uuid

import pytest
from django.core.cache import caches
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

# transaction=True: a plain django_db test runs inside a transaction of its own, so every
# atomic() the package opens would become a SAVEPOINT / RELEASE SAVEPOINT pair and the atomic
# mode's own BEGIN / COMMIT would never be sent: we would be counting the test harness, not
# what a request costs in production.
from django_idempotency import replay_cache
from tests.views import HAS_DRF

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"amount": 7}
TRANSACTION_BOUNDARIES = ("BEGIN", "COMMIT", "ROLLBACK")

needs_drf = pytest.mark.skipif(not HAS_DRF, reason="DRF is not installed (tox minimal)")

VIEWS = [
    pytest.param("/race/atomic/", "/race/plain/", True, id="decorator-atomic"),
    pytest.param("/race/lease/", "/race/plain/", False, id="decorator-lease"),
    pytest.param("/race/async/", "/race/async/plain/", False, id="decorator-async"),
    pytest.param("/race/drf/", "/race/drf/plain/", True, id="mixin", marks=needs_drf),
]


def send(url: str, key: str | None) -> tuple[int, bool, list[str]]:
    """POST once; return the status, whether it was a replay, and the SQL sent."""
    headers = {"Idempotency-Key": key} if key else {}
    with CaptureQueriesContext(connection) as captured:
        response = Client().post(
            f"{url}?note={uuid.uuid4().hex[:12]}",
            BODY,
            content_type="application/json",
            headers=headers,
        )
    replayed = response.get("Idempotent-Replayed") == "true"
    return response.status_code, replayed, [query["sql"] for query in captured.captured_queries]


def counted(queries: list[str]) -> list[str]:
    return [sql for sql in queries if not sql.upper().startswith(TRANSACTION_BOUNDARIES)]


def listing(queries: list[str]) -> str:
    return "\n".join(f"  {sql[:160]}" for sql in queries)


@pytest.fixture(autouse=True)
def _warm_up(statements):
    """One run of each view first, with the statement strategy under test (so every test runs
    with each), so lazily fetched server facts are not counted."""
    for url in ["/race/plain/", "/race/async/plain/"] + (["/race/drf/plain/"] if HAS_DRF else []):
        send(url, None)
    send("/race/atomic/", f"warm-up-{uuid.uuid4()}")


@pytest.mark.parametrize(("url", "twin", "atomic"), VIEWS)
def test_first_execution_costs_the_queries_of_its_mode_and_claims(url, twin, atomic, statements):
    status, _, own = send(twin, None)
    assert status == 201

    status, replayed, first = send(url, f"budget-{uuid.uuid4()}")

    assert (status, replayed) == (201, False)
    # With row locks, the atomic mode's claim is committed first and then locked (modes.md).
    budget = 4 if atomic and connection.features.has_select_for_update else 3
    if atomic and connection.vendor == "postgresql" and statements == "auto":
        # Advisory claims: read; lock and read again in one round trip; insert the completed
        # row. Nothing is written before the view, and one row version in all.
        budget = 3
    if atomic and connection.vendor == "mysql" and statements == "auto":
        # GET_LOCK claims: read; lock; read again; insert the completed row; release the
        # session's locks after the one commit.
        budget = 5
    extra = len(counted(first)) - len(counted(own))
    assert extra == budget, (
        f"{extra} statements on top of the view's {len(counted(own))} "
        f"({len(first)} queries in all, transaction boundaries included):\n{listing(first)}"
    )


REPLAYED_VIEWS = [pytest.param(view.values[0], id=view.id, marks=view.marks) for view in VIEWS]


@pytest.mark.parametrize("url", REPLAYED_VIEWS)
def test_replay_costs_one_query(url):
    key = f"budget-{uuid.uuid4()}"
    # The replay must send the same request (same note) as the first execution.
    note = uuid.uuid4().hex[:12]
    client = Client()
    first = client.post(
        f"{url}?note={note}",
        BODY,
        content_type="application/json",
        headers={"Idempotency-Key": key},
    )
    assert first.status_code == 201

    with CaptureQueriesContext(connection) as captured:
        replay = client.post(
            f"{url}?note={note}",
            BODY,
            content_type="application/json",
            headers={"Idempotency-Key": key},
        )

    queries = [query["sql"] for query in captured.captured_queries]
    assert len(queries) == 1, f"{len(queries)} queries for a replay:\n{listing(queries)}"
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == first.content


@pytest.fixture
def redis_replay_cache(settings):
    """The replay cache on the ``redis`` alias, emptied of replay entries around the test."""
    settings.IDEMPOTENCY_REPLAY_CACHE = "redis"
    cache = caches["redis"]
    cache.delete_pattern(replay_cache.PREFIX + "*")
    yield cache
    cache.delete_pattern(replay_cache.PREFIX + "*")


@pytest.mark.redis
@pytest.mark.parametrize("url", REPLAYED_VIEWS)
def test_replay_from_the_replay_cache_costs_no_query(url, redis_replay_cache):
    key = f"budget-{uuid.uuid4()}"
    note = uuid.uuid4().hex[:12]
    client = Client()
    first = client.post(
        f"{url}?note={note}",
        BODY,
        content_type="application/json",
        headers={"Idempotency-Key": key},
    )
    assert first.status_code == 201

    with CaptureQueriesContext(connection) as captured:
        replay = client.post(
            f"{url}?note={note}",
            BODY,
            content_type="application/json",
            headers={"Idempotency-Key": key},
        )

    queries = [query["sql"] for query in captured.captured_queries]
    assert queries == [], f"{len(queries)} queries for a cached replay:\n{listing(queries)}"
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == first.content
