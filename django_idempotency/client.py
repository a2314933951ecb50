"""A retrying HTTP client for endpoints protected by an ``Idempotency-Key``, built on httpx.

One key per logical operation, reused by each of its retries, so the server runs it once and
replays its stored answer. The retry rules, backoff and circuit breaker live in
``RetryPolicy`` and ``CircuitBreaker``; ``IdempotentClient`` and ``AsyncIdempotentClient`` only
send the requests and sleep. Needs the ``client`` extra: ``pip install django-idempotency[client]``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = [
    "AsyncIdempotentClient",
    "CircuitBreaker",
    "CircuitOpen",
    "IdempotentClient",
    "IdempotentClientError",
    "IdempotentRequestError",
    "IdempotentResult",
    "RetriesExhausted",
    "RetryPolicy",
    "parse_retry_after",
]

#: The code of the server's ``409`` for a key whose first request is still running.
IN_PROGRESS_CODE = "idempotency_key_in_progress"
REPLAYED_HEADER = "Idempotent-Replayed"
DEFAULT_HEADER = "Idempotency-Key"


# -- Errors ----------------------------------------------------------------------------------


class IdempotentClientError(Exception):
    """Base class: the operation did not get a final successful answer.

    ``key`` is the operation's idempotency key: calling again later with the same key (the
    ``idempotency_key`` argument) is safe, and gets the stored answer if the first run
    finished. ``history`` says what each attempt got, as in ``IdempotentResult.history``.
    """

    def __init__(
        self, message: str, *, key: str, attempts: int, history: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.key = key
        self.attempts = attempts
        self.history = history


class IdempotentRequestError(IdempotentClientError):
    """An answer that retrying cannot change: ``422``, another ``4xx``, a ``500``.

    Carries the status and, when the body is ``application/problem+json`` (RFC 9457), the
    problem's ``type``, ``title``, ``code`` and ``detail`` (``None`` otherwise).
    """

    def __init__(
        self,
        response: httpx.Response,
        *,
        key: str,
        attempts: int,
        history: tuple[str, ...] = (),
    ) -> None:
        self.response = response
        self.status_code = response.status_code
        problem = _problem(response)
        self.problem = problem
        self.type: str | None = _text(problem.get("type"))
        self.title: str | None = _text(problem.get("title"))
        self.code: str | None = _text(problem.get("code"))
        self.detail: str | None = _text(problem.get("detail"))
        described = f": {self.code}" if self.code else ""
        super().__init__(
            f"{response.request.method} {response.request.url} answered "
            f"{self.status_code}{described}",
            key=key,
            attempts=attempts,
            history=history,
        )


class RetriesExhausted(IdempotentClientError):
    """No final answer within the policy's attempts or deadline.

    ``last_response`` is the last retryable answer (``None`` when the last attempt failed
    without one: its exception is the ``__cause__``).
    """

    def __init__(
        self,
        message: str,
        *,
        key: str,
        attempts: int,
        last_response: httpx.Response | None,
        history: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, key=key, attempts=attempts, history=history)
        self.last_response = last_response


class CircuitOpen(IdempotentClientError):
    """The circuit breaker is open: nothing was sent. ``retry_in``: seconds until a probe."""

    def __init__(
        self, *, key: str, attempts: int, retry_in: float, history: tuple[str, ...] = ()
    ) -> None:
        super().__init__(
            f"circuit open after repeated failures; next probe in {retry_in:.1f} s",
            key=key,
            attempts=attempts,
            history=history,
        )
        self.retry_in = retry_in


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _problem(response: httpx.Response) -> dict[str, Any]:
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type != "application/problem+json":
        return {}
    try:
        body = json.loads(response.content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _describe(response: httpx.Response) -> str:
    """One answer in an operation's ``history``: ``201 replayed``, ``409 <problem code>``."""
    if response.headers.get(REPLAYED_HEADER, "").strip().lower() == "true":
        return f"{response.status_code} replayed"
    code = _text(_problem(response).get("code"))
    return f"{response.status_code} {code}" if code else str(response.status_code)


# -- Retry-After -----------------------------------------------------------------------------


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110): delta-seconds or an HTTP-date.

    ``None`` for a missing or unparseable value; a date in the past gives ``0.0``. ``now``
    (a Unix time, default ``time.time()``) is what an HTTP-date is measured from.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # "-0000": RFC 5322's unknown zone; HTTP-dates are GMT
        return None
    seconds = moment.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds)


# -- The circuit breaker ---------------------------------------------------------------------


class CircuitBreaker:
    """Fails fast after ``failure_threshold`` consecutive failures, for ``cool_down`` seconds.

    *Closed*: requests go through; a failure (a transport error or a ``5xx``) counts, any
    other answer resets the count. *Open*: ``allow()`` refuses until the cool-down has passed.
    *Half-open*: one probe goes through, others are refused; its success closes the breaker,
    its failure opens it for another cool-down. Shared by every call of a client (and may be
    shared between clients); thread-safe. ``clock`` is for tests.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(
        self,
        failure_threshold: int = 5,
        cool_down: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cool_down < 0:
            raise ValueError("cool_down must not be negative")
        self.failure_threshold = failure_threshold
        self.cool_down = cool_down
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at = 0.0
        self._state = self.CLOSED

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` (an open one whose cool-down passed)."""
        with self._lock:
            if self._state == self.OPEN and self._remaining() <= 0:
                return self.HALF_OPEN
            return self._state

    def _remaining(self) -> float:
        return self._opened_at + self.cool_down - self._clock()

    def allow(self) -> float | None:
        """``None`` if a request may go now; else the seconds until a probe may."""
        with self._lock:
            if self._state == self.CLOSED:
                return None
            if self._state == self.OPEN:
                remaining = self._remaining()
                if remaining > 0:
                    return remaining
                self._state = self.HALF_OPEN  # this caller is the probe
                return None
            # Half-open with its probe still out: the others wait for its verdict.
            return max(self._remaining(), 0.0)

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._state = self.CLOSED

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == self.HALF_OPEN or self._failures >= self.failure_threshold:
                self._state = self.OPEN
                self._opened_at = self._clock()


# -- The policy ------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry and how long to wait; shared by the sync and the async client.

    - ``max_attempts``: attempts per operation, the first included.
    - ``deadline``: seconds from the first attempt after which no retry starts (``None``:
      no deadline). A retry that would start after it is not made.
    - ``backoff_base``, ``backoff_cap``: the wait before retry *n* (0 for the first retry)
      is ``uniform(0, min(backoff_cap, backoff_base * 2**n))``, exponential backoff with
      full jitter.
    - ``max_retry_after``: a ``Retry-After`` is honoured up to this many seconds.
    - ``uniform``: the random source, ``random.uniform``; ``clock``: ``time.monotonic``.
      Both are for tests.
    """

    max_attempts: int = 5
    deadline: float | None = 60.0
    backoff_base: float = 0.1
    backoff_cap: float = 10.0
    max_retry_after: float = 30.0
    uniform: Callable[[float, float], float] = field(
        default=random.uniform, repr=False, compare=False
    )
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"max_attempts must be an integer of at least 1, not {attempts!r}")
        # "not x >= 0" also refuses NaN, which no comparison would stop: a NaN deadline was
        # no deadline, and a NaN backoff_cap made the wait NaN (time.sleep() raised).
        for name in ("backoff_base", "backoff_cap", "max_retry_after"):
            value = getattr(self, name)
            if not _is_number(value) or not value >= 0:
                raise ValueError(f"{name} must be a number of seconds, not negative: {value!r}")
        if self.deadline is not None and not (_is_number(self.deadline) and self.deadline > 0):
            raise ValueError(
                f"deadline must be None or a positive number of seconds, not {self.deadline!r}"
            )

    def backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` (0 for the first), with full jitter."""
        # Past 2**64 the cap has long won; the bound keeps the integer power small.
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** min(retry, 64))
        return self.uniform(0.0, ceiling)

    def retryable_status(self, response: httpx.Response) -> bool:
        """Whether an answer may change on retry: ``409`` in progress, ``429``, ``502-504``.

        A ``409`` is retried when its problem ``code`` is ``idempotency_key_in_progress``, or
        when it carries ``Retry-After``; other ``409`` answers (a response that was not
        stored, an application's own conflict) will not change.
        """
        status = response.status_code
        if status in (429, 502, 503, 504):
            return True
        if status == 409:
            code = _problem(response).get("code")
            return code == IN_PROGRESS_CODE or "Retry-After" in response.headers
        return False

    @staticmethod
    def retryable_error(error: Exception) -> bool:
        """Transport errors are retried (timeouts, refused or dropped connections)...

        ...except those of the request itself: an unsupported URL scheme, a malformed request.
        """
        return isinstance(error, httpx.TransportError) and not isinstance(
            error, (httpx.UnsupportedProtocol, httpx.LocalProtocolError)
        )

    def start(self, *, key: str, breaker: CircuitBreaker | None = None) -> Attempts:
        """The bookkeeping of one operation's attempts."""
        return Attempts(self, key=key, breaker=breaker, started=self.clock())


@dataclass
class IdempotentResult:
    """The final answer of an operation.

    ``replayed``: the server answered with the stored answer of an earlier attempt (its
    ``Idempotent-Replayed: true``), whose own answer was lost. ``history``: what each
    attempt got, in order, for logs, such as ``("timeout", "409 idempotency_key_in_progress",
    "201 replayed")``: a status with the problem's ``code`` or ``replayed``, ``timeout``, or
    the name of the transport error (``ConnectError``, ``RemoteProtocolError``).
    """

    response: httpx.Response
    key: str
    attempts: int
    history: tuple[str, ...] = ()

    @property
    def replayed(self) -> bool:
        value: str = self.response.headers.get(REPLAYED_HEADER, "")
        return value.strip().lower() == "true"

    @property
    def status_code(self) -> int:
        return self.response.status_code


class Attempts:
    """One operation's attempts: the policy's decisions, and the breaker's bookkeeping.

    The clients' loops call ``begin()`` before each attempt, then ``answered(response)`` or
    ``failed(error)``: each returns the seconds to sleep before the next attempt, or the
    final result, or raises. No I/O happens here.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        key: str,
        breaker: CircuitBreaker | None,
        started: float,
    ) -> None:
        self.policy = policy
        self.key = key
        self.breaker = breaker
        self.started = started
        self.count = 0
        self.history: list[str] = []

    def begin(self) -> None:
        """Before an attempt: raise ``CircuitOpen`` if the breaker refuses it."""
        if self.breaker is not None:
            retry_in = self.breaker.allow()
            if retry_in is not None:
                raise CircuitOpen(
                    key=self.key,
                    attempts=self.count,
                    retry_in=retry_in,
                    history=tuple(self.history),
                )
        self.count += 1

    def answered(self, response: httpx.Response) -> IdempotentResult | float:
        """The final result, or the seconds to wait before retrying; raises on a final error."""
        self.history.append(_describe(response))
        if self.breaker is not None:
            if response.status_code >= 500:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
        if response.is_success or response.is_redirect or response.status_code < 200:
            return IdempotentResult(
                response=response,
                key=self.key,
                attempts=self.count,
                history=tuple(self.history),
            )
        if not self.policy.retryable_status(response):
            raise IdempotentRequestError(
                response, key=self.key, attempts=self.count, history=tuple(self.history)
            )
        wait = parse_retry_after(response.headers.get("Retry-After"))
        if wait is None:
            wait = self.policy.backoff(self.count - 1)
        else:
            wait = min(wait, self.policy.max_retry_after)
        return self._next(wait, last=response)

    def failed(self, error: Exception) -> float:
        """The seconds to wait before retrying after ``error``; re-raises what is final."""
        self.history.append(
            "timeout" if isinstance(error, httpx.TimeoutException) else type(error).__name__
        )
        if not self.policy.retryable_error(error):
            raise error
        if self.breaker is not None:
            self.breaker.record_failure()
        return self._next(self.policy.backoff(self.count - 1), last=error)

    def _next(self, wait: float, *, last: httpx.Response | Exception) -> float:
        why = None
        if self.count >= self.policy.max_attempts:
            why = f"no final answer after {self.count} attempts"
        elif self.policy.deadline is not None:
            left = self.started + self.policy.deadline - self.policy.clock()
            if wait > left:
                why = f"no final answer within the {self.policy.deadline:g} s deadline"
        if why is None:
            return wait
        if isinstance(last, httpx.Response):
            why += f" (last: {last.status_code})"
            raise RetriesExhausted(
                why,
                key=self.key,
                attempts=self.count,
                last_response=last,
                history=tuple(self.history),
            )
        why += f" (last: {type(last).__name__})"
        raise RetriesExhausted(
            why,
            key=self.key,
            attempts=self.count,
            last_response=None,
            history=tuple(self.history),
        ) from last


# -- The clients -----------------------------------------------------------------------------


def new_key() -> str:
    """A fresh key for a new operation: a random UUID."""
    return str(uuid.uuid4())


class _Base:
    def __init__(
        self,
        *,
        policy: RetryPolicy | None,
        breaker: CircuitBreaker | None,
        header: str,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self.breaker = breaker
        self.header = header

    def _prepare(
        self, idempotency_key: str | None, headers: dict[str, str] | None
    ) -> tuple[Attempts, dict[str, str]]:
        if idempotency_key is None:
            key = new_key()
        elif isinstance(idempotency_key, str) and idempotency_key:
            key = idempotency_key
        else:
            # "" was silently replaced by a new random key: a restarted job calling with its
            # stored (empty) key would repeat the operation instead of getting its answer.
            raise ValueError(
                f"idempotency_key must be None (a new key) or a non-empty string, not "
                f"{idempotency_key!r}."
            )
        attempts = self.policy.start(key=key, breaker=self.breaker)
        return attempts, {**(headers or {}), self.header: key}


class IdempotentClient(_Base):
    """A retrying, synchronous client around ``httpx.Client``.

    Each call of ``request()`` (or ``post()``, ``put()``, ``patch()``, ``delete()``) is one
    operation: it gets a new key (or ``idempotency_key``, such as an agent's tool call id),
    sent in ``header`` on every attempt, and is retried per ``policy``. Returns an
    ``IdempotentResult``; raises ``IdempotentRequestError``, ``RetriesExhausted`` or
    ``CircuitOpen``. ``client``: an ``httpx.Client`` to use (not closed by ``close()``);
    otherwise one is made with ``client_options``. ``sleep`` is for tests.
    """

    def __init__(
        self,
        client: httpx.Client | None = None,
        *,
        policy: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        header: str = DEFAULT_HEADER,
        sleep: Callable[[float], None] = time.sleep,
        **client_options: Any,
    ) -> None:
        super().__init__(policy=policy, breaker=breaker, header=header)
        self._owned = client is None
        self.client = client if client is not None else httpx.Client(**client_options)
        self._sleep = sleep

    def request(
        self,
        method: str,
        url: str,
        *,
        idempotency_key: str | None = None,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> IdempotentResult:
        """Send one operation, retried; ``options`` go to ``httpx.Client.request()``."""
        attempts, headers = self._prepare(idempotency_key, headers)
        while True:
            attempts.begin()
            try:
                response = self.client.request(method, url, headers=headers, **options)
            except httpx.TransportError as error:
                wait = attempts.failed(error)
            else:
                outcome = attempts.answered(response)
                if isinstance(outcome, IdempotentResult):
                    return outcome
                wait = outcome
            self._sleep(wait)

    def post(self, url: str, **options: Any) -> IdempotentResult:
        return self.request("POST", url, **options)

    def put(self, url: str, **options: Any) -> IdempotentResult:
        return self.request("PUT", url, **options)

    def patch(self, url: str, **options: Any) -> IdempotentResult:
        return self.request("PATCH", url, **options)

    def delete(self, url: str, **options: Any) -> IdempotentResult:
        return self.request("DELETE", url, **options)

    def close(self) -> None:
        """Close the ``httpx.Client`` if this client made it."""
        if self._owned:
            self.client.close()

    def __enter__(self) -> IdempotentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncIdempotentClient(_Base):
    """``IdempotentClient`` for asyncio, around ``httpx.AsyncClient``; same policy, same rules.

    ``sleep`` (default ``asyncio.sleep``) is for tests.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        policy: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        header: str = DEFAULT_HEADER,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        **client_options: Any,
    ) -> None:
        super().__init__(policy=policy, breaker=breaker, header=header)
        self._owned = client is None
        self.client = client if client is not None else httpx.AsyncClient(**client_options)
        self._sleep = sleep

    async def request(
        self,
        method: str,
        url: str,
        *,
        idempotency_key: str | None = None,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> IdempotentResult:
        """Send one operation, retried; ``options`` go to ``httpx.AsyncClient.request()``."""
        attempts, headers = self._prepare(idempotency_key, headers)
        while True:
            attempts.begin()
            try:
                response = await self.client.request(method, url, headers=headers, **options)
            except httpx.TransportError as error:
                wait = attempts.failed(error)
            else:
                outcome = attempts.answered(response)
                if isinstance(outcome, IdempotentResult):
                    return outcome
                wait = outcome
            await self._sleep(wait)

    async def post(self, url: str, **options: Any) -> IdempotentResult:
        return await self.request("POST", url, **options)

    async def put(self, url: str, **options: Any) -> IdempotentResult:
        return await self.request("PUT", url, **options)

    async def patch(self, url: str, **options: Any) -> IdempotentResult:
        return await self.request("PATCH", url, **options)

    async def delete(self, url: str, **options: Any) -> IdempotentResult:
        return await self.request("DELETE", url, **options)

    async def aclose(self) -> None:
        """Close the ``httpx.AsyncClient`` if this client made it."""
        if self._owned:
            await self.client.aclose()

    async def __aenter__(self) -> AsyncIdempotentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
