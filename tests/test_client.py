"""The retrying client (django_idempotency.client, docs/client.md).

The policy and the breaker are tested alone, with a fixed random source and a fake clock; the
sync and async clients against ``httpx.MockTransport``. Then against a real gunicorn
(``tests/reliability_support.py``) behind a proxy that loses answers
(``tests/client_support.py``): a call whose first answer is lost, and one whose answer is lost
while the server restarts, each leave one charge, and the client ends with the stored answer.
Those share the test database with the gunicorn workers, so, like the crash tests, they need
row locks: PostgreSQL or MariaDB; they are skipped on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

httpx = pytest.importorskip("httpx", reason="httpx is not installed (the client extra)")

from django.db import connection  # noqa: E402

from django_idempotency.client import (  # noqa: E402
    AsyncIdempotentClient,
    CircuitBreaker,
    CircuitOpen,
    IdempotentClient,
    IdempotentRequestError,
    RetriesExhausted,
    RetryPolicy,
    parse_retry_after,
)
from django_idempotency.models import IdempotencyKey  # noqa: E402
from tests.client_support import LossyProxy  # noqa: E402
from tests.models import Charge  # noqa: E402
from tests.reliability_support import Server, worker_database_url  # noqa: E402

PROBLEM = "application/problem+json"
ERRORS = "https://github.com/django-idempotency/django-idempotency/blob/main/docs/errors.md"


def highest(low, high):
    """A "random" source that always picks the top of the range."""
    return high


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def problem(status, code, **headers):
    body = {
        "type": f"{ERRORS}#{code}",
        "title": code.replace("_", " ").capitalize(),
        "status": status,
        "detail": f"detail of {code}",
        "code": code,
    }
    return httpx.Response(
        status, content=json.dumps(body).encode(), headers={"Content-Type": PROBLEM, **headers}
    )


class Script:
    """A MockTransport handler answering from a list; records each request it received."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request):
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def keys(self):
        return [request.headers.get("Idempotency-Key") for request in self.requests]


def sync_client(script, *, sleeps=None, **options):
    options.setdefault("policy", RetryPolicy(uniform=highest))
    return IdempotentClient(
        httpx.Client(transport=httpx.MockTransport(script), base_url="http://api.test"),
        sleep=(sleeps if sleeps is not None else []).append,
        **options,
    )


# -- The policy ------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_the_capped_exponential():
    calls = []

    def uniform(low, high):
        calls.append((low, high))
        return high

    policy = RetryPolicy(backoff_base=0.1, backoff_cap=1.0, uniform=uniform)

    waits = [policy.backoff(retry) for retry in (0, 1, 2, 3, 4, 10_000)]

    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert all(low == 0.0 for low, _ in calls)
    assert RetryPolicy(uniform=lambda low, high: low).backoff(3) == 0.0


def test_backoff_with_the_real_random_source_stays_within_its_bounds():
    policy = RetryPolicy(backoff_base=0.5, backoff_cap=2.0)
    for retry in range(8):
        assert 0.0 <= policy.backoff(retry) <= min(2.0, 0.5 * 2**retry)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("Wed, 21 Oct 2015 07:28:00 -0000", None),  # no zone: not an HTTP-date
    ],
)
def test_retry_after_is_delta_seconds(value, seconds):
    assert parse_retry_after(value) == seconds


def test_retry_after_may_be_an_http_date():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)

    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(30.0)
    assert parse_retry_after(format_datetime(now - timedelta(hours=1), usegmt=True)) == 0.0


@pytest.mark.parametrize(
    ("response", "retried"),
    [
        (problem(409, "idempotency_key_in_progress", **{"Retry-After": "1"}), True),
        (problem(409, "idempotency_key_in_progress"), True),
        (httpx.Response(409, headers={"Retry-After": "2"}), True),
        (problem(409, "idempotency_response_not_stored"), False),
        (httpx.Response(409, json={"error": "username taken"}), False),
        (httpx.Response(429), True),
        (httpx.Response(502), True),
        (problem(503, "idempotency_store_unavailable", **{"Retry-After": "1"}), True),
        (httpx.Response(504), True),
        (httpx.Response(400), False),
        (httpx.Response(404), False),
        (problem(422, "idempotency_key_mismatch"), False),
        (httpx.Response(500), False),
    ],
)
def test_which_answers_are_retried(response, retried):
    assert RetryPolicy().retryable_status(response) is retried


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ReadTimeout("slow"), True),
        (httpx.ConnectTimeout("slow"), True),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), True),
        (httpx.ReadError("reset"), True),
        (httpx.UnsupportedProtocol("ftp"), False),
        (httpx.LocalProtocolError("bad header"), False),
        (ValueError("not a transport error"), False),
    ],
)
def test_which_errors_are_retried(error, retried):
    assert RetryPolicy.retryable_error(error) is retried


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"backoff_base": -1},
        {"backoff_cap": -1},
        {"max_retry_after": -1},
        # NaN passed every comparison: no deadline at all, or a NaN wait (time.sleep raised).
        {"deadline": float("nan")},
        {"backoff_cap": float("nan")},
        {"deadline": -5},
        {"deadline": 0},
        {"max_attempts": 2.5},
        {"max_attempts": "3"},
        {"backoff_base": "0.1"},
    ],
)
def test_a_policy_refuses_impossible_settings(options):
    with pytest.raises(ValueError, match="must"):
        RetryPolicy(**options)


# -- The breaker -----------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_a_success_resets_the_count():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cool_down=10, clock=clock)

    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed"
    assert breaker.allow() is None

    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.allow() == pytest.approx(10.0)
    clock.now += 4
    assert breaker.allow() == pytest.approx(6.0)


def test_breaker_lets_one_probe_through_after_the_cool_down_and_closes_on_its_success():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cool_down=10, clock=clock)
    breaker.record_failure()
    clock.now += 10

    assert breaker.state == "half-open"
    assert breaker.allow() is None  # the probe
    assert breaker.state == "half-open"
    assert breaker.allow() == 0.0  # the others wait for the probe's verdict
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow() is None


def test_a_failed_probe_opens_the_breaker_for_another_cool_down():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=5, cool_down=10, clock=clock)
    for _ in range(5):
        breaker.record_failure()
    clock.now += 11
    assert breaker.allow() is None

    breaker.record_failure()

    assert breaker.state == "open"
    assert breaker.allow() == pytest.approx(10.0)


@pytest.mark.parametrize("options", [{"failure_threshold": 0}, {"cool_down": -1}])
def test_a_breaker_refuses_impossible_settings(options):
    with pytest.raises(ValueError, match="must"):
        CircuitBreaker(**options)


# -- The sync client -------------------------------------------------------------------------


def test_every_attempt_of_an_operation_sends_the_same_new_key():
    script = Script(httpx.Response(503), httpx.Response(502), httpx.Response(201, json={"id": 1}))
    sleeps = []

    result = sync_client(script, sleeps=sleeps).post("/orders/", json={"amount": 7})

    assert result.status_code == 201
    assert result.attempts == 3
    assert result.replayed is False
    assert len(set(script.keys)) == 1
    assert str(uuid.UUID(script.keys[0])) == script.keys[0] == result.key
    assert sleeps == pytest.approx([0.1, 0.2])  # the policy's backoff, at its top
    assert [json.loads(request.content) for request in script.requests] == [{"amount": 7}] * 3


def test_each_operation_gets_its_own_key():
    script = Script(httpx.Response(201), httpx.Response(201))
    client = sync_client(script)

    client.post("/orders/")
    client.post("/orders/")

    assert script.keys[0] != script.keys[1]


def test_the_key_and_the_header_name_can_be_chosen():
    script = Script(httpx.Response(201))
    client = sync_client(script, header="X-Request-Key")

    result = client.post("/orders/", idempotency_key="call_7fQ2kX9bV1", headers={"X-A": "b"})

    assert result.key == "call_7fQ2kX9bV1"
    assert script.requests[0].headers["X-Request-Key"] == "call_7fQ2kX9bV1"
    assert script.requests[0].headers["X-A"] == "b"
    assert "Idempotency-Key" not in script.requests[0].headers


@pytest.mark.parametrize("key", ["", 42, b"k1"])
def test_a_key_that_is_not_a_non_empty_string_is_refused_before_sending(key):
    # "" was replaced by a new random key: a job retrying with its stored empty key would
    # have repeated the operation instead of getting its answer.
    script = Script(httpx.Response(201))

    with pytest.raises(ValueError, match=r"idempotency_key must be None \(a new key\) or a"):
        sync_client(script).post("/orders/", idempotency_key=key)

    assert script.requests == []


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_each_method_helper_sends_its_method(method):
    script = Script(httpx.Response(204))

    getattr(sync_client(script), method)("/orders/1")

    assert script.requests[0].method == method.upper()


def test_connection_errors_and_timeouts_are_retried():
    script = Script(
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.Response(201, headers={"Idempotent-Replayed": "true"}),
    )

    result = sync_client(script).post("/orders/")

    assert result.attempts == 4
    assert result.replayed is True
    assert result.history == ("ConnectError", "timeout", "RemoteProtocolError", "201 replayed")
    assert len(set(script.keys)) == 1


@pytest.mark.parametrize(
    ("answer", "wait"),
    [
        (problem(409, "idempotency_key_in_progress", **{"Retry-After": "1"}), 1.0),
        (httpx.Response(429, headers={"Retry-After": "120"}), 5.0),  # capped
        (problem(503, "idempotency_store_unavailable", **{"Retry-After": "2"}), 2.0),
        (httpx.Response(429, headers={"Retry-After": "whenever"}), 0.1),  # the backoff
    ],
)
def test_retry_after_is_honoured_up_to_its_cap(answer, wait):
    script = Script(answer, httpx.Response(201))
    sleeps = []

    sync_client(script, sleeps=sleeps, policy=RetryPolicy(max_retry_after=5, uniform=highest)).post(
        "/orders/"
    )

    assert sleeps == pytest.approx([wait])


def test_a_mismatch_is_raised_at_once_with_the_problem():
    script = Script(problem(422, "idempotency_key_mismatch"))
    sleeps = []

    with pytest.raises(IdempotentRequestError) as raised:
        sync_client(script, sleeps=sleeps).post("/orders/", idempotency_key="k1")

    error = raised.value
    assert error.status_code == 422
    assert error.code == "idempotency_key_mismatch"
    assert error.type == f"{ERRORS}#idempotency_key_mismatch"
    assert error.title == "Idempotency key mismatch"
    assert error.detail == "detail of idempotency_key_mismatch"
    assert error.key == "k1"
    assert error.attempts == 1
    assert error.history == ("422 idempotency_key_mismatch",)
    assert error.response.status_code == 422
    assert "422: idempotency_key_mismatch" in str(error)
    assert sleeps == []


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(404, text="<h1>Not found</h1>", headers={"Content-Type": "text/html"}),
        httpx.Response(400, content=b"{not json", headers={"Content-Type": PROBLEM}),
        httpx.Response(400, content=b"[1, 2]", headers={"Content-Type": PROBLEM}),
        httpx.Response(500, json={"code": "looks like a problem, is not one"}),
    ],
)
def test_an_error_without_a_problem_body_has_only_its_status(answer):
    with pytest.raises(IdempotentRequestError) as raised:
        sync_client(Script(answer)).post("/orders/")

    assert raised.value.status_code == answer.status_code
    assert (raised.value.type, raised.value.code, raised.value.title) == (None, None, None)
    assert raised.value.detail is None


def test_a_redirect_is_a_final_answer():
    script = Script(httpx.Response(303, headers={"Location": "/orders/1"}))

    result = sync_client(script).post("/orders/")

    assert result.status_code == 303


def test_it_gives_up_after_its_attempts_with_the_last_answer():
    script = Script(*[httpx.Response(503)] * 3)

    with pytest.raises(RetriesExhausted, match=r"after 3 attempts \(last: 503\)") as raised:
        sync_client(script, policy=RetryPolicy(max_attempts=3, uniform=highest)).post("/o/")

    assert raised.value.last_response is not None
    assert raised.value.last_response.status_code == 503
    assert raised.value.attempts == 3
    assert raised.value.history == ("503", "503", "503")
    assert len(set(script.keys)) == 1


def test_it_gives_up_after_its_attempts_with_the_last_error_as_cause():
    script = Script(httpx.ConnectError("refused"), httpx.ConnectError("refused again"))

    with pytest.raises(RetriesExhausted, match="last: ConnectError") as raised:
        sync_client(script, policy=RetryPolicy(max_attempts=2)).post("/orders/")

    assert raised.value.last_response is None
    assert str(raised.value.__cause__) == "refused again"


def test_no_retry_starts_after_the_deadline():
    clock = Clock()
    script = Script(*[httpx.Response(503)] * 10)
    policy = RetryPolicy(max_attempts=10, deadline=1.0, uniform=lambda low, high: 0.4, clock=clock)

    def sleep(seconds):
        clock.now += seconds

    client = IdempotentClient(
        httpx.Client(transport=httpx.MockTransport(script)), policy=policy, sleep=sleep
    )
    with pytest.raises(RetriesExhausted, match="within the 1 s deadline"):
        client.post("http://api.test/orders/")

    assert len(script.requests) == 3  # at 0, 0.4 and 0.8 s; the next would start at 1.2 s


def test_without_a_deadline_only_the_attempts_count():
    script = Script(*[httpx.Response(503)] * 4, httpx.Response(201))
    policy = RetryPolicy(max_attempts=5, deadline=None, backoff_base=3600, uniform=highest)

    result = sync_client(script, policy=policy).post("/orders/")

    assert result.attempts == 5


def test_an_error_of_the_request_itself_is_not_retried():
    script = Script(httpx.UnsupportedProtocol("Request URL has an unsupported protocol"))

    with pytest.raises(httpx.UnsupportedProtocol):
        sync_client(script).post("/orders/")

    assert len(script.requests) == 1


def test_an_open_breaker_fails_fast_then_a_successful_probe_closes_it():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, cool_down=30, clock=clock)
    script = Script(httpx.Response(503), httpx.ConnectError("refused"), httpx.Response(201))
    client = sync_client(script, breaker=breaker, policy=RetryPolicy(max_attempts=1))

    with pytest.raises(RetriesExhausted):
        client.post("/orders/")
    with pytest.raises(RetriesExhausted):
        client.post("/orders/")
    with pytest.raises(CircuitOpen) as raised:
        client.post("/orders/")
    assert raised.value.retry_in == pytest.approx(30.0)
    assert raised.value.attempts == 0
    assert len(script.requests) == 2  # nothing sent while open

    clock.now += 30
    assert client.post("/orders/").status_code == 201
    assert breaker.state == "closed"


def test_the_breaker_opening_cuts_an_operations_retries_short():
    breaker = CircuitBreaker(failure_threshold=2, cool_down=30)
    script = Script(*[httpx.Response(502)] * 5)

    with pytest.raises(CircuitOpen):
        sync_client(script, breaker=breaker).post("/orders/")

    assert len(script.requests) == 2


def test_answers_that_are_not_server_errors_keep_the_breaker_closed():
    breaker = CircuitBreaker(failure_threshold=1)
    script = Script(problem(409, "idempotency_key_in_progress"), httpx.Response(201))

    sync_client(script, breaker=breaker).post("/orders/")

    assert breaker.state == "closed"


def test_close_closes_only_the_httpx_client_it_made():
    own = IdempotentClient(base_url="http://api.test")
    with own:
        pass
    assert own.client.is_closed

    given = httpx.Client()
    IdempotentClient(given).close()
    assert not given.is_closed
    given.close()


# -- The async client ------------------------------------------------------------------------


def test_the_async_client_follows_the_same_policy():
    script = Script(
        httpx.ReadTimeout("slow"),
        problem(409, "idempotency_key_in_progress", **{"Retry-After": "1"}),
        httpx.Response(201, headers={"Idempotent-Replayed": "true"}),
    )
    sleeps = []

    async def sleep(seconds):
        sleeps.append(seconds)

    async def main():
        transport = httpx.MockTransport(script)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as http:
            client = AsyncIdempotentClient(
                http, policy=RetryPolicy(uniform=highest), sleep=sleep, header="Idempotency-Key"
            )
            return await client.post("/orders/", json={"amount": 7})

    result = asyncio.run(main())

    assert result.replayed is True
    assert result.attempts == 3
    assert len(set(script.keys)) == 1
    assert sleeps == pytest.approx([0.1, 1.0])


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_each_async_method_helper_sends_its_method(method):
    script = Script(httpx.Response(204))

    async def main():
        async with AsyncIdempotentClient(transport=httpx.MockTransport(script)) as client:
            await getattr(client, method)("http://api.test/orders/1")
        return client

    client = asyncio.run(main())

    assert script.requests[0].method == method.upper()
    assert client.client.is_closed


def test_the_async_client_raises_what_the_sync_one_raises():
    script = Script(problem(422, "idempotency_key_mismatch"))

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as http:
            await AsyncIdempotentClient(http).post("http://api.test/orders/")

    with pytest.raises(IdempotentRequestError, match="idempotency_key_mismatch"):
        asyncio.run(main())


def test_the_async_client_leaves_a_given_httpx_client_open():
    async def main():
        http = httpx.AsyncClient()
        await AsyncIdempotentClient(http).aclose()
        closed = http.is_closed
        await http.aclose()
        return closed

    assert asyncio.run(main()) is False


# -- Against a real server -------------------------------------------------------------------

row_locks = pytest.mark.skipif(
    not connection.features.has_select_for_update,
    reason="needs a database the gunicorn workers share, with row locks: PostgreSQL or MariaDB",
)

#: Short waits, so that a test retries many times within seconds.
FAST = RetryPolicy(max_attempts=200, deadline=60, backoff_base=0.05, backoff_cap=0.3)


@pytest.fixture(scope="module")
def database_server(tmp_path_factory, django_db_setup) -> Iterator[Server]:
    if not connection.features.has_select_for_update:
        pytest.skip("needs PostgreSQL or MariaDB")
    server = Server(
        tmp_path_factory.mktemp("client-db"), RELIABILITY_DATABASE_URL=worker_database_url()
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(database_server) -> Iterator[LossyProxy]:
    proxy = LossyProxy(database_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


def _assert_one_charge_replayed(note, result):
    assert result.status_code == 201
    assert result.replayed is True
    assert Charge.objects.filter(note=note).count() == 1
    row = IdempotencyKey.objects.get(key=result.key)
    assert row.state == IdempotencyKey.State.COMPLETED
    assert row.response_body == result.response.content
    assert json.loads(result.response.content)["effect"] == Charge.objects.get(note=note).pk


@row_locks
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_a_call_whose_answer_was_lost_is_retried_into_the_stored_answer(proxy, mode):
    note = uuid.uuid4().hex[:12]
    proxy.lose_next_answer()

    with IdempotentClient(base_url=proxy.url, policy=FAST, timeout=20) as client:
        result = client.post(f"/effect/{mode}/?note={note}", json={"amount": 7})

    assert proxy.lost_answers == 1
    assert result.attempts == 2
    assert result.history[-1] == "201 replayed"
    _assert_one_charge_replayed(note, result)


@row_locks
@pytest.mark.django_db(transaction=True)
def test_the_async_client_retries_a_lost_answer_into_the_stored_answer(proxy):
    note = uuid.uuid4().hex[:12]
    proxy.lose_next_answer()

    async def main():
        async with AsyncIdempotentClient(base_url=proxy.url, policy=FAST, timeout=20) as client:
            return await client.post(f"/effect/atomic/?note={note}", json={"amount": 7})

    result = asyncio.run(main())

    assert result.attempts == 2
    _assert_one_charge_replayed(note, result)


@row_locks
@pytest.mark.django_db(transaction=True)
def test_a_call_retried_through_a_server_restart_gets_the_stored_answer(tmp_path):
    """The first answer is lost and the server goes away; the retries meet a new server."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = Server(tmp_path / "first", RELIABILITY_DATABASE_URL=worker_database_url())
    proxy = LossyProxy(first.port)
    second = None
    note = uuid.uuid4().hex[:12]
    outcome = {}

    def call():
        with IdempotentClient(base_url=proxy.url, policy=FAST, timeout=20) as client:
            try:
                outcome["result"] = client.post(f"/effect/atomic/?note={note}", json={"a": 1})
            except Exception as error:  # reported below, not lost in the thread
                outcome["error"] = error

    try:
        proxy.lose_next_answer(then_down=True)
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        assert proxy.lost.wait(20), "the first request never reached the server"
        first.stop()
        second = Server(tmp_path / "second", RELIABILITY_DATABASE_URL=worker_database_url())
        assert proxy.refused > 0, "no retry met the server while it was down"
        proxy.upstream = second.port
        thread.join(60)
        assert not thread.is_alive(), "the client never got an answer"
    finally:
        proxy.close()
        first.stop()
        if second is not None:
            second.stop()

    assert "error" not in outcome, outcome
    result = outcome["result"]
    assert result.attempts >= 3  # the lost answer, at least one refusal, the replay
    _assert_one_charge_replayed(note, result)
