"""Assertions for a project's own tests: one line per endpoint proves it idempotent.

    from django_idempotency.testing import assert_idempotent

    assert_idempotent(client, "/api/orders/", {"amount": "25.00"}, effect=Order.objects.count)

Works with Django's test ``Client`` and DRF's ``APIClient`` (their authentication is used as
is), under pytest or ``unittest``. Failures are ``AssertionError``s that say what differed.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import connections

from django_idempotency.conf import conf
from django_idempotency.http import NEVER_STORED_HEADERS, REPLAYED_HEADER

__all__ = ["IdempotencyCheck", "assert_idempotent", "assert_idempotent_concurrently"]

# Headers a replay may differ in: never stored (cookies, Date, hop-by-hop, the replay mark),
# or set per response by middleware (Vary: Cookie once a view touched the session).
_PER_RESPONSE = NEVER_STORED_HEADERS | {"vary"}


@dataclass(frozen=True)
class IdempotencyCheck:
    """What an assertion saw: the key it sent, the first response and its replays."""

    key: str
    response: Any
    replays: list[Any]


def _send(client: Any, method: str, path: str, data: Any, key: str, **extra: Any) -> Any:
    send = getattr(client, method.lower())
    headers = {**(extra.pop("headers", None) or {}), conf.IDEMPOTENCY_HEADER: key}
    return send(path, data, headers=headers, **extra)


def _describe(response: Any) -> str:
    body = bytes(getattr(response, "content", b""))
    shown = body[:300].decode("utf-8", "replace") + ("..." if len(body) > 300 else "")
    return f"{response.status_code} {shown}"


def _kept_headers(response: Any) -> dict[str, str]:
    return {
        name.lower(): value for name, value in response.items() if name.lower() not in _PER_RESPONSE
    }


def _assert_first(response: Any, where: str) -> None:
    if response.get("Content-Type", "").startswith("application/problem+json"):
        raise AssertionError(f"{where} was answered by django-idempotency: {_describe(response)}")
    if response.status_code >= 500:
        raise AssertionError(
            f"{where} failed with {_describe(response)}; server errors are not stored, so "
            "there is nothing to replay."
        )
    if response.get(REPLAYED_HEADER) == "true":
        raise AssertionError(
            f"{where} was already a replay: the key was used before this assertion."
        )


def _assert_replay(first: Any, replay: Any, where: str) -> None:
    if replay.get(REPLAYED_HEADER) != "true":
        raise AssertionError(
            f"{where}: a retry with the same Idempotency-Key was not replayed (no "
            f"{REPLAYED_HEADER}: true): {_describe(replay)}. Is the view protected by "
            "@idempotent, IdempotentMixin or IdempotencyMiddleware, for this method?"
        )
    if replay.status_code != first.status_code:
        raise AssertionError(
            f"{where}: the replay's status {replay.status_code} differs from the first "
            f"response's {first.status_code}."
        )
    if bytes(replay.content) != bytes(first.content):
        raise AssertionError(
            f"{where}: the replay's body differs from the first response's.\n"
            f"  first:  {_describe(first)}\n  replay: {_describe(replay)}"
        )
    first_headers, replay_headers = _kept_headers(first), _kept_headers(replay)
    if replay_headers != first_headers:
        differing = sorted(
            name
            for name in first_headers.keys() | replay_headers.keys()
            if first_headers.get(name) != replay_headers.get(name)
        )
        raise AssertionError(
            f"{where}: the replay's headers differ from the first response's: "
            + ", ".join(
                f"{name}: {first_headers.get(name)!r} then {replay_headers.get(name)!r}"
                for name in differing
            )
        )


def _assert_effect(before: Any, after: Any, last: Any, where: str) -> None:
    if after == before:
        raise AssertionError(
            f"{where} had no effect: effect() was {before!r} before and after it, so the "
            "assertion cannot tell one run from two. Pass an effect that the request changes."
        )
    if last != after:
        raise AssertionError(
            f"{where} ran more than once: effect() was {before!r} before, {after!r} after "
            f"the first request and {last!r} after the retries with the same key."
        )


def assert_idempotent(
    client: Any,
    path: str,
    data: Any = None,
    *,
    effect: Callable[[], Any],
    method: str = "post",
    retries: int = 1,
    key: str | None = None,
    content_type: str | None = "application/json",
    **extra: Any,
) -> IdempotencyCheck:
    """Send a request, then ``retries`` retries with the same key; assert one effect.

    Asserts that the first response is the view's own (not a 5xx, not a problem response of
    this layer), that ``effect()`` (say ``Order.objects.count``) changed once and only once,
    and that every retry is marked ``Idempotent-Replayed: true`` and has the first response's
    status, body and headers. A fresh key (a UUID) is used unless ``key`` is given; ``extra``
    goes to the client (``headers=``, ``format=`` for DRF's ``APIClient``, ...).
    """
    key = key or str(uuid.uuid4())
    where = f"{method.upper()} {path}"
    if content_type is not None and "format" not in extra:
        extra["content_type"] = content_type
    before = effect()
    first = _send(client, method, path, data, key, **copy.copy(extra))
    _assert_first(first, where)
    after = effect()
    replays = [_send(client, method, path, data, key, **copy.copy(extra)) for _ in range(retries)]
    last = effect()
    _assert_effect(before, after, last, where)
    for replay in replays:
        _assert_replay(first, replay, where)
    return IdempotencyCheck(key=key, response=first, replays=replays)


def assert_idempotent_concurrently(
    client: Any,
    path: str,
    data: Any = None,
    *,
    effect: Callable[[], Any],
    method: str = "post",
    requests: int = 5,
    key: str | None = None,
    content_type: str | None = "application/json",
    **extra: Any,
) -> IdempotencyCheck:
    """Send ``requests`` copies of a request at once with one key; assert one effect.

    Each copy runs in its own thread with its own copy of ``client`` (same credentials and
    cookies). Exactly one may run the view; the others must be replays of it or
    ``409 idempotency_key_in_progress``. A last retry, once all have finished, must replay.

    The threads need their own database connections that see committed data, so the test
    must not run inside a transaction: use ``@pytest.mark.django_db(transaction=True)`` or
    ``TransactionTestCase``, on a database that allows concurrent writers (PostgreSQL,
    MariaDB/MySQL, or SQLite in a file, not in memory).
    """
    if connections["default"].in_atomic_block:
        raise AssertionError(
            "assert_idempotent_concurrently needs a test outside a transaction, so that its "
            "threads see each other's writes: use @pytest.mark.django_db(transaction=True) "
            "or TransactionTestCase."
        )
    key = key or str(uuid.uuid4())
    where = f"{method.upper()} {path}"
    if content_type is not None and "format" not in extra:
        extra["content_type"] = content_type
    before = effect()
    barrier = threading.Barrier(requests)
    answers: list[Any] = [None] * requests
    errors: list[BaseException] = []

    def send(index: int) -> None:
        own = copy.copy(client)
        own.cookies = copy.deepcopy(client.cookies)
        try:
            barrier.wait(timeout=10)
            answers[index] = _send(own, method, path, data, key, **copy.copy(extra))
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=send, args=(index,)) for index in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    ran = [answer for answer in answers if not _layer_answer(answer)]
    if len(ran) != 1:
        raise AssertionError(
            f"{where}: {len(ran)} of {requests} concurrent requests with one key ran the view "
            f"(expected 1): {', '.join(_describe(answer) for answer in answers)}"
        )
    [first] = ran
    _assert_first(first, where)
    after = effect()
    final = _send(client, method, path, data, key, **copy.copy(extra))
    _assert_effect(before, after, effect(), where)
    replays = [answer for answer in answers if answer is not first]
    for answer in [*replays, final]:
        if _in_progress(answer):
            continue
        _assert_replay(first, answer, where)
    if _in_progress(final):
        raise AssertionError(f"{where}: still in progress after every request had finished.")
    return IdempotencyCheck(key=key, response=first, replays=[*replays, final])


def _in_progress(response: Any) -> bool:
    return response.status_code == 409 and b"idempotency_key_in_progress" in bytes(response.content)


def _layer_answer(response: Any) -> bool:
    """A replay or an in-progress answer: not a run of the view."""
    return response.get(REPLAYED_HEADER) == "true" or _in_progress(response)
