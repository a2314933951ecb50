"""Same-key requests racing across the worker processes of a real gunicorn, on the cache store.

docs/contract.md and docs/modes.md: simultaneous duplicates run the view exactly once, whichever
process receives them. The test threads in ``tests/test_cache_store.py`` share one process; here
16 requests sent at once over HTTP reach four sync worker processes of a real gunicorn, whose
only shared state is Redis. The app (``tests/gunicorn_settings.py``,
``tests/gunicorn_views.py``) counts its views' runs with a Redis ``INCR``: a counter in a
process's memory would not see the other workers, and pytest-django's in-memory SQLite test
database is not shared across processes either, so a Redis counter works the same on every
database the suite runs on.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.cache.backends.base import default_key_func

from tests.redis_support import (
    Answer,
    assert_in_progress,
    assert_replay_of,
    delete_keys,
    new_prefix,
)
from tests.reliability_support import Server

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4
DUPLICATES = 16
VIEW_SECONDS = 1.0
TIMEOUT = 15  # seconds: for gunicorn to start or stop, and for each request


class Gunicorn(Server):
    """The reliability suite's gunicorn, serving ``tests.gunicorn_views`` with its Redis prefix."""

    def __init__(self, directory: Path, redis_url: str) -> None:
        self.prefix = new_prefix()
        import redis  # not at the top: the tox "minimal" env has no redis-py

        self.redis = redis.Redis.from_url(redis_url)
        super().__init__(
            directory,
            workers=WORKERS,
            settings="tests.gunicorn_settings",
            timeout=TIMEOUT,
            GUNICORN_TEST_KEY_PREFIX=self.prefix,
        )

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            delete_keys(self.redis, self.prefix)
            self.redis.close()

    def runs(self, note: str) -> int:
        """How many times a view ran for ``note``, in any worker (``tests.gunicorn_views``)."""
        count = self.redis.get(default_key_func(f"runs:{note}", self.prefix, 1))
        return int(count or 0)


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory) -> Iterator[Gunicorn]:
    server = Gunicorn(tmp_path_factory.mktemp("gunicorn"), os.environ["REDIS_URL"])
    try:
        yield server
    finally:
        server.stop()


def race(gunicorn: Gunicorn, url: str, key: str) -> list[Answer]:
    """Send ``DUPLICATES`` requests from as many threads released together."""
    barrier = threading.Barrier(DUPLICATES, timeout=TIMEOUT)
    answers: list[Any] = [None] * DUPLICATES
    errors: list[BaseException] = []

    def send(index: int) -> None:
        try:
            barrier.wait()
            answers[index] = gunicorn.post(url, key)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(DUPLICATES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a request never came back"
    if errors:
        raise errors[0]
    return answers


def summary(answers: list[Answer]) -> Counter[str]:
    return Counter(f"{answer.status} {answer.code or answer.replayed}" for answer in answers)


def the_first(answers: list[Answer]) -> Answer:
    firsts = [answer for answer in answers if answer.status == 201 and not answer.replayed]
    assert len(firsts) == 1, summary(answers)
    return firsts[0]


def test_simultaneous_duplicates_across_worker_processes_run_the_view_once(gunicorn):
    note, key = uuid.uuid4().hex[:12], f"race-{uuid.uuid4()}"
    url = f"/count/lease/?note={note}&sleep={VIEW_SECONDS}"

    answers = race(gunicorn, url, key)

    assert gunicorn.runs(note) == 1, summary(answers)
    first = the_first(answers)
    for answer in answers:
        if answer is first:
            continue
        if answer.status == 409:
            assert_in_progress(answer)
        else:
            assert_replay_of(answer, first)
    assert any(answer.status == 409 for answer in answers), summary(answers)
    # The race was between processes, not inside one.
    assert len({answer.headers["X-Served-By"] for answer in answers}) > 1
    assert_replay_of(gunicorn.post(url, key), first)
    assert gunicorn.runs(note) == 1


def test_simultaneous_duplicates_across_worker_processes_with_wait_get_one_response(gunicorn):
    note, key = uuid.uuid4().hex[:12], f"race-{uuid.uuid4()}"
    url = f"/count/wait/?note={note}&sleep={VIEW_SECONDS}"

    answers = race(gunicorn, url, key)

    assert gunicorn.runs(note) == 1, summary(answers)
    first = the_first(answers)
    for answer in answers:
        if answer is not first:
            assert_replay_of(answer, first)
    assert len({answer.headers["X-Served-By"] for answer in answers}) > 1
    assert max(answer.elapsed for answer in answers) < 5 + VIEW_SECONDS, summary(answers)


def test_requests_with_different_keys_each_run_once(gunicorn):
    note = uuid.uuid4().hex[:12]
    url = f"/count/lease/?note={note}"

    answers = [gunicorn.post(url, f"distinct-{uuid.uuid4()}") for _ in range(3)]

    assert [answer.status for answer in answers] == [201] * 3
    assert not any(answer.replayed for answer in answers)
    assert gunicorn.runs(note) == 3
