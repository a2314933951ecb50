"""The cache store when Redis fails: killed, paused, or down with ``IDEMPOTENCY_FAIL_OPEN``.

docs/contract.md, "Answers": when the store is unreachable the answer is ``503
idempotency_store_unavailable`` with ``Retry-After``, the view does not run (unless
``IDEMPOTENCY_FAIL_OPEN`` says so), and nothing is stored. Each test starts a ``redis-server``
of its own on a free port, so it can kill it (SIGKILL), pause it (SIGSTOP: connections stay open
but nothing answers, like a server stuck in a long command or a network that drops packets) and
start it again on the same port. Its cache alias sets 0.5 s socket timeouts, which bound how
long a request waits for a server that does not answer.

These tests are marked ``redis`` like the other Redis tests, and they also need the
``redis-server`` executable (``scripts/services.sh`` installs it).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest
from django.test import Client, RequestFactory

from django_idempotency.conf import get_fingerprint_function
from django_idempotency.exceptions import StoreUnavailable
from django_idempotency.stores import CacheStore, ClaimRequest
from tests import race_views
from tests.redis_support import (
    Answer,
    RedisServer,
    assert_fresh_run,
    assert_in_progress,
    assert_replay_of,
    assert_store_unavailable,
    disconnect,
    redis_server_binary,
    use_cache_store,
)

pytestmark = pytest.mark.redis

SOCKET_TIMEOUT = 0.5  # seconds, for both connecting and reading
#: How long a request may take to answer 503 when Redis does not answer: one timed-out read,
#: with room for a slow machine, but far below a hang.
BOUND = 3.0
TIMEOUT = 10  # seconds: a stuck request fails its test instead of hanging the run


@pytest.fixture
def server(tmp_path):
    server = RedisServer(redis_server_binary(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(settings, server):
    """The cache store on the test's own server, with bounded socket timeouts."""
    timeouts = {"SOCKET_CONNECT_TIMEOUT": SOCKET_TIMEOUT, "SOCKET_TIMEOUT": SOCKET_TIMEOUT}
    alias = use_cache_store(settings, server.url(), OPTIONS=timeouts)
    yield alias
    disconnect(alias)


def new_note() -> str:
    return uuid.uuid4().hex[:12]


def post(url: str, key: str | None) -> Answer:
    headers = {} if key is None else {"Idempotency-Key": key}
    started = time.monotonic()
    response = Client(raise_request_exception=False).post(
        url, {"amount": 7}, content_type="application/json", headers=headers
    )
    return Answer.of(response, started)


class Background:
    """``post(url, key)`` in a thread of its own."""

    def __init__(self, url: str, key: str) -> None:
        self._answers: list[Answer] = []
        self._thread = threading.Thread(
            target=lambda: self._answers.append(post(url, key)), daemon=True
        )
        self._thread.start()

    def answer(self) -> Answer:
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), f"no answer after {TIMEOUT} s"
        (answer,) = self._answers
        return answer


def records(caplog, level: int) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "django_idempotency" and record.levelno == level
    ]


# -- Redis killed ---------------------------------------------------------------------------


def test_redis_killed_between_requests_answers_503_until_it_is_back(server, store):
    note = new_note()
    url = f"/race/count/lease/?note={note}"
    first = post(url, "order-1")
    assert_fresh_run(first)

    server.kill()
    answers = [post(url, "order-1"), post(url, "order-2")]  # a retry and a new key

    for answer in answers:
        assert_store_unavailable(answer)
        assert answer.elapsed < BOUND, answer
    assert race_views.runs(note) == 1
    # Nothing else is broken: a request without a key is not covered and still runs.
    assert_fresh_run(post(url, None))
    assert race_views.runs(note) == 2

    server.start()  # on the same port, empty
    fresh = post(url, "order-3")
    assert_fresh_run(fresh)
    assert_replay_of(post(url, "order-3"), fresh)
    assert race_views.runs(note) == 3


def test_redis_killed_while_the_view_runs(server, store, caplog):
    note = new_note()
    url = f"/race/count/lease/?note={note}"
    go = race_views.hold_runs(note)
    running = Background(url, "order-1")
    assert race_views.entered(note).wait(TIMEOUT), "the request never reached its view"

    server.kill()
    go.set()
    answer = running.answer()

    # The view has run: its answer is the truth, and the failure to store it is logged
    # (docs/modes.md, the lease mode's window).
    assert_fresh_run(answer)
    assert answer.elapsed < 1 + BOUND, answer
    (error,) = records(caplog, logging.ERROR)
    assert "Could not store the response" in error.getMessage()
    # While Redis is down, a retry is refused; the view does not run again.
    assert_store_unavailable(post(url, "order-1"))
    assert race_views.runs(note) == 1

    server.start()
    fresh = post(f"/race/count/lease/?note={note}-after", "order-2")
    assert_fresh_run(fresh)
    assert_replay_of(post(f"/race/count/lease/?note={note}-after", "order-2"), fresh)


# -- Redis paused: it accepts connections but never answers -------------------------------


def test_redis_paused_answers_503_within_the_socket_timeout(server, store):
    note = new_note()
    url = f"/race/count/lease/?note={note}"
    assert_fresh_run(post(url, "warm-up"))  # the pool holds an open connection now

    server.pause()
    try:
        answers = [post(url, "order-1"), post(url, "order-2")]
    finally:
        server.resume()

    for answer in answers:
        assert_store_unavailable(answer)
        assert answer.elapsed < BOUND, answer
    assert race_views.runs(note) == 1
    fresh = post(url, "order-3")
    assert_fresh_run(fresh)
    assert_replay_of(post(url, "order-3"), fresh)


def test_redis_paused_while_the_view_runs_does_not_hold_the_answer(server, store, caplog):
    note = new_note()
    url = f"/race/count/lease/?note={note}"
    go = race_views.hold_runs(note)
    running = Background(url, "order-1")
    assert race_views.entered(note).wait(TIMEOUT), "the request never reached its view"

    server.pause()
    try:
        let_go = time.monotonic()
        go.set()
        answer = running.answer()
        answered_after = time.monotonic() - let_go
    finally:
        server.resume()

    assert_fresh_run(answer)
    assert answered_after < BOUND, answered_after
    assert records(caplog, logging.ERROR)
    assert race_views.runs(note) == 1


# -- IDEMPOTENCY_FAIL_OPEN ------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_fail_open_runs_the_view_unprotected_and_warns_each_time(
    outage, server, store, settings, caplog
):
    settings.IDEMPOTENCY_FAIL_OPEN = True
    note = new_note()
    url = f"/race/count/lease/?note={note}"
    assert_fresh_run(post(url, "warm-up"))
    caplog.clear()

    if outage == "killed":
        server.kill()
    else:
        server.pause()
    try:
        with caplog.at_level(logging.WARNING, logger="django_idempotency"):
            answers = [post(url, "order-1"), post(url, "order-1")]
    finally:
        if outage == "paused":
            server.resume()

    # The view's own answers, not replays: the same key ran twice, as the setting allows.
    for answer in answers:
        assert_fresh_run(answer)
        assert answer.elapsed < BOUND, answer
    assert answers[0].run != answers[1].run
    assert race_views.runs(note) == 3
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 2
    for warning in warnings:
        assert "unavailable" in warning.getMessage()
        assert "IDEMPOTENCY_FAIL_OPEN" in warning.getMessage()
    assert records(caplog, logging.ERROR) == []


def test_fail_open_protects_again_once_redis_is_back(server, store, settings):
    settings.IDEMPOTENCY_FAIL_OPEN = True
    note = new_note()
    url = f"/race/count/lease/?note={note}"
    server.kill()
    assert_fresh_run(post(url, "order-1"))

    server.start()
    first = post(url, "order-2")
    assert_fresh_run(first)
    assert_replay_of(post(url, "order-2"), first)
    assert race_views.runs(note) == 2


def test_claim_that_timed_out_but_landed_holds_retries_off_only_for_its_lease(
    server, store, settings
):
    # A paused server still receives what was sent to it: the claim that timed out (and was
    # answered 503) is written when the server resumes, with a token no request holds. Its
    # lease is never renewed, so it holds the key for one lease at most; then the same
    # request takes it over and runs once.
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(seconds=1)
    note = new_note()
    url = f"/race/count/lease/?note={note}"
    data = {"amount": 7}
    claim = ClaimRequest(
        scope="anonymous",
        key="order-1",
        fingerprint=get_fingerprint_function()(
            RequestFactory().post(url, data, content_type="application/json")
        ),
        method="POST",
        path="/race/count/lease/",
        token=uuid.uuid4().hex,
        ttl=timedelta(minutes=1),
    )
    cache_store = CacheStore()
    cache_store.claim(replace(claim, key="warm-up", token="warm-up"), lease=timedelta(seconds=1))

    server.pause()
    try:
        with pytest.raises(StoreUnavailable):
            cache_store.claim(claim, lease=timedelta(seconds=1))
    finally:
        server.resume()

    landed = cache_store.get(scope="anonymous", key="order-1")
    assert landed.owner_token == claim.token
    assert_in_progress(post(url, "order-1"))
    time.sleep(max(0.0, landed.lease_remaining) + 0.1)
    assert_fresh_run(post(url, "order-1"))
    assert race_views.runs(note) == 1
