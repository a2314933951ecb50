"""Races of real threads and real processes against PostgreSQL and MariaDB.

docs/modes.md (the atomic and the lease mode): simultaneous duplicates run a view exactly once,
a slow lease-mode request keeps its key, a dead worker's key is freed (by the database in the
atomic mode, by its lease in the lease mode) and nothing it half-wrote survives, keys never
cross users. Nothing is mocked: each thread sends its request through Django's test client with
a database connection of its own, and a "worker" is a separate Python process that the test
kills with SIGKILL.

These tests need row locks, so they are skipped on SQLite; run them with
``DATABASE_URL=postgres://...`` or ``DATABASE_URL=mysql://...``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.contrib.auth import get_user_model
from django.db import connection, connections
from django.db.models.functions import Now
from django.test import AsyncClient, Client, RequestFactory
from django.utils.datastructures import CaseInsensitiveMapping

from django_idempotency.conf import get_fingerprint_function
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import ClaimRequest, DatabaseStore, StoredResponse
from tests import race_views
from tests.models import Charge
from tests.views import HAS_DRF

needs_drf = pytest.mark.skipif(not HAS_DRF, reason="DRF is not installed (tox minimal)")

pytestmark = [
    pytest.mark.concurrency,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not connection.features.has_select_for_update,
        reason=(
            "concurrency tests need a database with row locks: set DATABASE_URL to a "
            "PostgreSQL or MariaDB/MySQL server (SQLite serialises writers, and pytest-django's "
            "in-memory SQLite test database cannot be raced from several threads)"
        ),
    ),
]

ROOT = Path(__file__).resolve().parent.parent
DUPLICATES = 16
VIEW_SECONDS = 0.4
T = TypeVar("T")
TIMEOUT = 20  # seconds: a stuck thread or process fails its test instead of hanging the run
BODY = {"amount": 7}


# -- Sending requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content: bytes
    headers: CaseInsensitiveMapping[str]
    elapsed: float

    @classmethod
    def of(cls, response: Any, started: float) -> Answer:
        return cls(
            status=response.status_code,
            content=response.content,
            headers=CaseInsensitiveMapping(dict(response.items())),
            elapsed=time.monotonic() - started,
        )

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"

    @property
    def code(self) -> str | None:
        if self.headers.get("Content-Type") != "application/problem+json":
            return None
        return json.loads(self.content)["code"]

    def __repr__(self) -> str:
        kind = self.code or ("replay" if self.replayed else "")
        return f"<{self.status} {kind} {self.elapsed:.2f}s>"


def new_client() -> Client:
    # Django's test client collects exceptions through a global signal, so a client waiting on
    # its own answer would re-raise the exception of a request running in another thread.
    return Client(raise_request_exception=False)


def new_key() -> str:
    return f"race-{uuid.uuid4()}"


def new_note() -> str:
    return uuid.uuid4().hex[:12]


def target(url: str, note: str, sleep: float = 0.0) -> str:
    return f"{url}?note={note}&sleep={sleep}"


def post(client: Client, url: str, key: str) -> Answer:
    started = time.monotonic()
    response = client.post(
        url, BODY, content_type="application/json", headers={"Idempotency-Key": key}
    )
    return Answer.of(response, started)


def join(threads: list[threading.Thread], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        # Unblock them, so that they close their connections and the test database can be
        # flushed, then fail.
        cancelled = cancel_lock_waits()
        for thread in threads:
            thread.join(TIMEOUT)
        pytest.fail(
            f"still running after {timeout} s: {stuck} "
            f"({cancelled} statements waiting on a database lock were cancelled)"
        )


def cancel_lock_waits() -> int:
    """Cancel the statements of other sessions on the test database that wait on a lock."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE "
                "datname = current_database() AND pid <> pg_backend_pid() "
                "AND wait_event_type = 'Lock'"
            )
            return len(cursor.fetchall())
        cursor.execute(
            "SELECT trx.trx_mysql_thread_id FROM information_schema.innodb_trx trx "
            "JOIN information_schema.processlist process ON process.id = trx.trx_mysql_thread_id "
            "WHERE trx.trx_state = 'LOCK WAIT' AND process.db = DATABASE()"
        )
        waiting = [thread_id for (thread_id,) in cursor.fetchall()]
        for thread_id in waiting:
            cursor.execute(f"KILL QUERY {int(thread_id)}")
        return len(waiting)


def race(
    send: Callable[[Client, int], Answer],
    n: int = DUPLICATES,
    *,
    prepare: Callable[[Client, int], None] | None = None,
    timeout: float = TIMEOUT,
) -> list[Answer]:
    """Send ``n`` requests from ``n`` threads released together; return their answers."""
    barrier = threading.Barrier(n, timeout=TIMEOUT)
    answers: list[Answer | None] = [None] * n
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            client = new_client()
            if prepare is not None:
                prepare(client, index)
            barrier.wait()
            answers[index] = send(client, index)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            connection.close()  # this thread's own connection

    threads = [
        threading.Thread(target=worker, args=(index,), name=f"race-{index}", daemon=True)
        for index in range(n)
    ]
    for thread in threads:
        thread.start()
    join(threads, timeout)
    if errors:
        raise errors[0]
    done = [answer for answer in answers if answer is not None]
    assert len(done) == n
    return done


class Background:
    """Call ``function`` in a thread of its own, which closes its connection when done."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], Any]) -> None:
        try:
            self._result = function()
        except BaseException as exc:
            self._error = exc
        finally:
            connection.close()

    def result(self) -> Any:
        join([self._thread])
        if self._error is not None:
            raise self._error
        return self._result


def while_in_flight(url: str, key: str, note: str, during: Callable[[], T]) -> tuple[T, Answer]:
    """POST ``url`` with ``key`` in the background and, once its view has started (``note``),
    call ``during``: what ``during`` returned, and the background request's answer."""
    holder = Background(lambda: post(new_client(), url, key))
    assert race_views.entered(note).wait(TIMEOUT), "the first request never reached its view"
    try:
        seen = during()
    finally:
        original = holder.result()
    return seen, original


def post_different(url: str, key: str) -> Any:
    """A different request (another amount) with ``key``: Django's test response."""
    return new_client().post(
        url, {"amount": 8}, content_type="application/json", headers={"Idempotency-Key": key}
    )


# -- What the answers must look like --------------------------------------------------------


def summary(answers: list[Answer]) -> Counter[str]:
    return Counter(f"{answer.status} {answer.code or answer.replayed}" for answer in answers)


def assert_in_progress(answer: Answer) -> None:
    assert answer.status == 409, answer
    assert answer.code == "idempotency_key_in_progress"
    assert int(answer.headers["Retry-After"]) >= 1


def assert_fresh_run(answer: Answer) -> None:
    """The view's own answer (the test views answer 201), not a replay."""
    assert answer.status == 201, answer
    assert not answer.replayed, answer


def assert_replay_of(answer: Answer, first: Answer) -> None:
    assert answer.replayed, answer
    assert answer.status == first.status
    assert answer.content == first.content
    for name in ("Content-Type", "Location"):
        assert answer.headers[name] == first.headers[name]


def assert_ran_once(answers: list[Answer], note: str) -> Answer:
    """The view ran exactly once; every other answer is a 409 or a replay of that run."""
    assert race_views.runs(note) == 1, summary(answers)
    assert Charge.objects.filter(note=note).count() == 1
    firsts = [answer for answer in answers if answer.status == 201 and not answer.replayed]
    assert len(firsts) == 1, summary(answers)
    (first,) = firsts
    for answer in answers:
        if answer is first:
            continue
        if answer.status == 409:
            assert_in_progress(answer)
        else:
            assert_replay_of(answer, first)
    return first


def key_row(key: str) -> Any:
    """The key's row, with the database's clock (``db_now``) read in the same query."""
    return IdempotencyKey.objects.annotate(db_now=Now()).get(key=key)


def wait_until_lease_passes(key: str) -> None:
    """Wait until the key's lease has passed on the database's clock."""
    deadline = key_row(key).lease_until
    started = time.monotonic()
    while key_row(key).db_now <= deadline:
        assert time.monotonic() - started < TIMEOUT
        time.sleep(0.05)


# -- 16 simultaneous duplicates -------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("/race/atomic/", id="decorator-atomic"),
        pytest.param("/race/lease/", id="decorator-lease"),
        pytest.param("/race/drf/", id="mixin", marks=needs_drf),
    ],
)
def test_simultaneous_duplicates_run_the_view_exactly_once(url):
    key, note = new_key(), new_note()
    url = target(url, note, VIEW_SECONDS)

    answers = race(lambda client, _: post(client, url, key))

    first = assert_ran_once(answers, note)
    # Released together, most duplicates arrive while the first is still running.
    assert any(answer.status == 409 for answer in answers), summary(answers)
    assert key_row(key).state == IdempotencyKey.State.COMPLETED
    assert_replay_of(post(new_client(), url, key), first)


def test_simultaneous_duplicates_run_an_async_view_exactly_once():
    key, note = new_key(), new_note()
    url = target("/race/async/", note, VIEW_SECONDS)

    async def one(go: asyncio.Event) -> Answer:
        # One ThreadSensitiveContext per request, as Django's ASGI handler opens: each
        # request's sync_to_async work (claim, the view's ORM call, completion) runs in a
        # thread of its own with its own connection, so the claims race in the database.
        async with ThreadSensitiveContext():
            try:
                await go.wait()
                started = time.monotonic()
                response = await AsyncClient(raise_request_exception=False).post(
                    url, BODY, content_type="application/json", headers={"Idempotency-Key": key}
                )
                return Answer.of(response, started)
            finally:
                # (a lambda: ``connection.close`` would be looked up in the loop's thread)
                await sync_to_async(lambda: connection.close())()

    async def main() -> list[Answer]:
        go = asyncio.Event()
        tasks = [asyncio.ensure_future(one(go)) for _ in range(DUPLICATES)]
        await asyncio.sleep(0.05)  # every task is now waiting on go
        go.set()
        return list(await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT))

    # The event loop runs in a fresh thread, as under an ASGI server: one started from this
    # thread would copy its context, and with it this thread's database connection.
    answers = Background(lambda: asyncio.run(main())).result()

    first = assert_ran_once(answers, note)
    assert any(answer.status == 409 for answer in answers), summary(answers)
    assert_replay_of(post(new_client(), url, key), first)


def test_simultaneous_duplicates_with_wait_all_get_the_one_response():
    key, note = new_key(), new_note()
    url = target("/race/wait/", note, VIEW_SECONDS)

    answers = race(lambda client, _: post(client, url, key))

    first = assert_ran_once(answers, note)
    assert all(answer.status == 201 for answer in answers), summary(answers)
    assert len({answer.content for answer in answers}) == 1
    assert sum(answer.replayed for answer in answers) == DUPLICATES - 1
    assert max(answer.elapsed for answer in answers) < 5, summary(answers)
    assert_replay_of(post(new_client(), url, key), first)


# -- The lease mode: slow requests keep their key, dead ones lose it ------------------------


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("/race/lease/", id="decorator-lease"),
        pytest.param("/race/async/", id="decorator-async"),
    ],
)
def test_lease_mode_view_slower_than_its_lease_is_never_run_twice(url, settings):
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(seconds=1)
    key, note = new_key(), new_note()
    url = target(url, note, sleep=3)
    slow = Background(lambda: post(new_client(), url, key))
    assert race_views.entered(note).wait(TIMEOUT), "the slow request never reached its view"
    entered_at = time.monotonic()
    client = new_client()
    retries = []
    try:
        for at in (1.5, 2.5):  # both well past the 1 s lease the request claimed
            time.sleep(max(0.0, entered_at + at - time.monotonic()))
            row = key_row(key)
            assert row.lease_until > row.db_now, "the running request's lease was not renewed"
            retries.append(post(client, url, key))
    finally:
        original = slow.result()

    for retry in retries:
        assert_in_progress(retry)
    assert_fresh_run(original)
    assert race_views.runs(note) == 1
    assert Charge.objects.filter(note=note).count() == 1
    assert_replay_of(post(client, url, key), original)


def test_simultaneous_retries_take_over_a_dead_requests_passed_lease_once():
    key, note = new_key(), new_note()
    url = target("/race/lease/", note, VIEW_SECONDS)
    # What a lease-mode request that died inside its view leaves behind: its committed claim,
    # whose short lease nobody renews any more.
    request = RequestFactory().post(url, BODY, content_type="application/json")
    dead = ClaimRequest(
        scope="anonymous",
        key=key,
        fingerprint=get_fingerprint_function()(request),
        method="POST",
        path="/race/lease/",
        token=uuid.uuid4().hex,
        ttl=timedelta(hours=1),
    )
    assert DatabaseStore().claim(dead, lease=timedelta(seconds=1.5)).owner_token == dead.token
    assert_in_progress(post(new_client(), url, key))  # not before the lease has passed
    wait_until_lease_passes(key)

    answers = race(lambda client, _: post(client, url, key))

    first = assert_ran_once(answers, note)
    assert key_row(key).owner_token != dead.token
    assert_replay_of(post(new_client(), url, key), first)


def test_request_whose_lease_was_taken_over_cannot_complete_or_release_the_new_owners_key():
    store = DatabaseStore()
    request = {
        "scope": "anonymous",
        "key": new_key(),
        "fingerprint": "f" * 64,
        "method": "POST",
        "path": "/race/lease/",
        "ttl": timedelta(hours=1),
    }
    old = ClaimRequest(token=uuid.uuid4().hex, **request)
    new = ClaimRequest(token=uuid.uuid4().hex, **request)
    old_response = StoredResponse(status=201, headers=[], body=b'{"owner": "old"}')
    new_response = StoredResponse(status=201, headers=[], body=b'{"owner": "new"}')

    assert store.claim(old, lease=timedelta(milliseconds=500)).owner_token == old.token
    assert store.claim(new, lease=timedelta(seconds=30)).owner_token == old.token  # not yet
    wait_until_lease_passes(request["key"])
    assert store.claim(new, lease=timedelta(seconds=30)).owner_token == new.token  # taken over

    # The old owner wakes up and tries to renew, store its response, or give the key back.
    assert store.renew(old, lease=timedelta(seconds=30)) is False
    assert store.complete(old, old_response) is False
    assert store.release(old) is False
    row = key_row(request["key"])
    assert (row.state, row.owner_token, row.response_body) == ("in_progress", new.token, None)

    assert store.complete(new, new_response) is True
    assert store.complete(old, old_response) is False
    assert store.release(old) is False
    record = store.get(scope="anonymous", key=request["key"])
    assert record is not None
    assert record.owner_token == new.token
    assert record.response == new_response


# -- Killed workers -------------------------------------------------------------------------


def worker_database_url() -> str:
    """``DATABASE_URL`` with the name of the test database pytest-django created."""
    url = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(url._replace(path="/" + connection.settings_dict["NAME"]))


class Worker:
    """An application server handling one request in a process of its own."""

    def __init__(self, tmp_path: Path, url: str, key: str, *, hold: str, **env: str) -> None:
        self.marker = tmp_path / "inside.json"
        self.log_path = tmp_path / "worker.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.race_worker", url, key, json.dumps(BODY)],
            cwd=ROOT,
            env={
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "tests.settings",
                "DATABASE_URL": worker_database_url(),
                "PYTHONPATH": str(ROOT),
                "RACE_WORKER_HOLD": hold,
                "RACE_WORKER_MARKER": str(self.marker),
                **env,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_inside_view(self) -> dict[str, Any]:
        """Wait until the worker is inside the view; its marker names its DB connection."""
        deadline = time.monotonic() + TIMEOUT
        while not self.marker.exists():
            if self.process.poll() is not None:
                pytest.fail(f"worker exited before entering the view:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker did not enter the view in {TIMEOUT} s:\n{self.output()}")
            time.sleep(0.02)
        return json.loads(self.marker.read_text())

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=TIMEOUT) == -signal.SIGKILL

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT)
        self._log.close()


def wait_until_connection_is_gone(backend: int) -> float:
    """Wait until the server has noticed that a killed worker's connection is gone."""
    if connection.vendor == "postgresql":
        sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
    else:
        sql = "SELECT count(*) FROM information_schema.processlist WHERE id = %s"
    started = time.monotonic()
    while True:
        with connection.cursor() as cursor:
            cursor.execute(sql, [backend])
            (count,) = cursor.fetchone()
        if not count:
            return time.monotonic() - started
        assert time.monotonic() - started < TIMEOUT, "the server kept a dead worker's connection"
        time.sleep(0.02)


def test_worker_killed_inside_an_atomic_view_leaves_nothing_written_and_the_key_free(tmp_path):
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note)
    worker = Worker(tmp_path, url, key, hold="after")  # blocks after writing its effect row
    try:
        inside = worker.wait_inside_view()
        assert inside["in_atomic_block"], "the atomic-mode view ran outside a transaction"
        worker.kill()
    finally:
        worker.close()
    wait_until_connection_is_gone(inside["backend"])

    assert Charge.objects.filter(note=note).count() == 0, "a dead worker's write survived"
    row = IdempotencyKey.objects.filter(key=key).first()
    assert row is None or (row.state, row.response_body) == ("in_progress", None)

    retry = post(new_client(), url, key)

    assert_fresh_run(retry)
    assert retry.elapsed < 2, retry  # at once: no lease to wait out
    assert race_views.runs(note) == 1
    assert Charge.objects.filter(note=note).count() == 1
    assert key_row(key).state == IdempotencyKey.State.COMPLETED
    assert_replay_of(post(new_client(), url, key), retry)


def test_lease_of_a_killed_worker_is_taken_over_after_it_passes_and_not_before(tmp_path):
    key, note = new_key(), new_note()
    url = target("/race/lease/", note)
    # The worker's heartbeat renews its 2 s lease every ~0.7 s until the worker dies.
    worker = Worker(tmp_path, url, key, hold="before", RACE_WORKER_LOCK_TTL="2")
    try:
        worker.wait_inside_view()
        time.sleep(0.8)  # let the heartbeat renew the lease at least once
        worker.kill()
    finally:
        worker.close()
    dead = key_row(key)
    assert dead.state == IdempotencyKey.State.IN_PROGRESS
    deadline = dead.lease_until
    assert deadline > dead.db_now, "the worker's lease had passed while it was alive"

    client = new_client()
    refused = 0
    for _ in range(100):
        before = key_row(key).db_now
        retry = post(client, url, key)
        after = key_row(key).db_now
        if retry.status != 409:
            break
        assert_in_progress(retry)
        assert before < deadline, "the dead worker's lease had passed, yet the retry was refused"
        refused += 1
        time.sleep(0.1)
    else:
        pytest.fail("the dead worker's key was never taken over")

    assert refused >= 1, "the first retry came after the lease had passed: nothing was tested"
    assert_fresh_run(retry)
    assert after >= deadline, "the key was taken over before the dead worker's lease passed"
    assert race_views.runs(note) == 1
    assert Charge.objects.filter(note=note).count() == 1
    assert_replay_of(post(client, url, key), retry)


# -- Scope, duplicates of a locked key, crashes, ATOMIC_REQUESTS ----------------------------


def test_same_key_from_two_users_at_once_runs_once_per_user_and_never_crosses():
    users = [get_user_model().objects.create_user(name) for name in ("alice", "bob")]
    key, note = new_key(), new_note()
    url = target("/race/atomic/", note, VIEW_SECONDS)

    answers = race(
        lambda client, _: post(client, url, key),
        n=2,
        prepare=lambda client, index: client.force_login(users[index]),
    )

    assert [answer.status for answer in answers] == [201, 201], answers
    assert not any(answer.replayed for answer in answers)
    (start_a, end_a), (start_b, end_b) = race_views.windows(note)
    assert max(start_a, start_b) < min(end_a, end_b), "the two runs did not overlap"
    for answer, user, other in zip(answers, users, reversed(users), strict=True):
        assert json.loads(answer.content)["user"] == user.username
        assert other.username.encode() not in answer.content
    assert answers[0].content != answers[1].content
    assert Charge.objects.filter(note=note).count() == 2
    for answer, user in zip(answers, users, strict=True):
        client = new_client()
        client.force_login(user)
        assert_replay_of(post(client, url, key), answer)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("/race/atomic/", id="decorator"),
        pytest.param("/race/drf/", id="mixin", marks=needs_drf),
    ],
)
def test_duplicate_of_a_request_holding_the_row_lock_gets_409_at_once(url):
    key, note = new_key(), new_note()
    url = target(url, note, sleep=1.5)
    duplicate, original = while_in_flight(url, key, note, lambda: post(new_client(), url, key))

    assert_in_progress(duplicate)
    assert duplicate.elapsed < 0.5, duplicate  # the view holds the lock for 1.5 s
    assert_fresh_run(original)
    assert race_views.runs(note) == 1


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("/race/atomic/", id="atomic"),
        pytest.param("/race/lease/", id="lease"),
        pytest.param("/race/drf/", id="mixin", marks=needs_drf),
    ],
)
def test_different_request_with_the_key_of_a_running_one_gets_422_at_once(url):
    key, note = new_key(), new_note()
    url = target(url, note, sleep=1.5)

    def different() -> tuple[Any, float]:
        started = time.monotonic()
        return post_different(url, key), time.monotonic() - started

    (other, elapsed), original = while_in_flight(url, key, note, different)

    # Not 409: a retry of this request could never succeed with this key.
    assert other.status_code == 422, other.content
    assert json.loads(other.content)["code"] == "idempotency_key_mismatch"
    assert elapsed < 0.5
    assert_fresh_run(original)
    assert race_views.runs(note) == 1


def test_waiting_duplicate_runs_the_view_when_the_first_request_crashes():
    key, note = new_key(), new_note()
    url = target("/race/wait/", note, sleep=0.6)
    race_views.fail_next_run(note)  # the first run raises after writing its effect row
    # The duplicate waits on the first request's row lock.
    waiting, crashed = while_in_flight(url, key, note, lambda: post(new_client(), url, key))

    assert crashed.status == 500
    assert_fresh_run(waiting)
    assert waiting.elapsed < 5, waiting
    assert race_views.runs(note) == 2
    assert Charge.objects.filter(note=note).count() == 1  # the crashed run's was rolled back
    assert_replay_of(post(new_client(), url, key), waiting)


@pytest.fixture
def atomic_requests():
    """``ATOMIC_REQUESTS = True`` on the default database, for every thread's connection."""
    settings_dict = connections["default"].settings_dict
    previous = settings_dict["ATOMIC_REQUESTS"]
    settings_dict["ATOMIC_REQUESTS"] = True
    try:
        seen = []
        thread = threading.Thread(
            target=lambda: seen.append(connections["default"].settings_dict["ATOMIC_REQUESTS"])
        )
        thread.start()
        join([thread])
        assert seen == [True], "a new thread's connection does not see ATOMIC_REQUESTS"
        yield
    finally:
        settings_dict["ATOMIC_REQUESTS"] = previous


@pytest.mark.usefixtures("atomic_requests")
@pytest.mark.parametrize(
    ("url", "waits"),
    [
        pytest.param("/race/atomic/", False, id="decorator-atomic"),
        pytest.param("/race/wait/", True, id="decorator-atomic-wait"),
        pytest.param("/race/lease/", False, id="decorator-lease"),
        pytest.param("/race/drf/", False, id="mixin", marks=needs_drf),
    ],
)
def test_simultaneous_duplicates_under_atomic_requests_run_the_view_once(url, waits, settings):
    # A view longer than a third of the lease, so that in the lease mode the heartbeat renews
    # the lease while the view runs (and the request's transaction holds the claimed row).
    settings.IDEMPOTENCY_LOCK_TTL = timedelta(seconds=1)
    key, note = new_key(), new_note()
    url = target(url, note, sleep=1)

    answers = race(lambda client, _: post(client, url, key), timeout=10)

    first = assert_ran_once(answers, note)
    assert max(answer.elapsed for answer in answers) < 5, answers  # nobody hangs on a lock
    if waits:
        assert all(answer.status == 201 for answer in answers), summary(answers)
    assert_replay_of(post(new_client(), url, key), first)
