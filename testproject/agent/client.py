"""A tool-calling client, as an agent runtime has one: it calls a tool over HTTP and retries.

``call_tool()`` sends one tool call of the model to ``POST <base_url>/<name>/`` with
``{"arguments": {...}}`` and returns the ``{"result": ...}`` it gets back. The retrying is
django-idempotency's own client (``django_idempotency.client``, the ``client`` extra, on
httpx): it retries through timeouts, dropped connections, ``409 idempotency_key_in_progress``,
``429`` and ``502``/``503``/``504``, always with the same ``Idempotency-Key`` (the model's
tool call id), so the tool's effect happens once however often the call is sent::

    result = call_tool(
        "http://127.0.0.1:8000/agent/tools",
        "issue_refund",
        {"order_id": "ord_1001", "amount": "25.00"},
        tool_call_id="call_7fQ2kX9bV1",
        timeout=10,
    )
    result.result  # {"refund_id": "re_...", ...}; also result.replayed, result.answers
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from django_idempotency.client import (
    IdempotentClient,
    IdempotentClientError,
    IdempotentRequestError,
    RetryPolicy,
)

#: The longest pause between attempts: of the backoff, and whatever a ``Retry-After`` asks for.
MAX_BACKOFF = 2.0
MAX_RETRY_AFTER = 30.0


@dataclass(frozen=True)
class ToolResult:
    """A tool call's answer: the tool's ``result``, and how the client came by it."""

    result: Any
    status: int
    #: ``True`` when the answer was the stored answer of an earlier attempt
    #: (``Idempotent-Replayed: true``): that attempt ran the tool, this one did not.
    replayed: bool
    #: What each attempt got, in order, such as
    #: ``("timeout", "409 idempotency_key_in_progress", "201 replayed")``.
    answers: tuple[str, ...]

    @property
    def attempts(self) -> int:
        return len(self.answers)


class ToolCallError(Exception):
    """The tool answered with an error that retrying will not change.

    Carries the RFC 9457 problem the server sent (``type``, ``title``, ``detail``; ``code``
    for django-idempotency's own problems), for the runtime to hand to the model, which
    then decides what to do: fix the arguments and call again with a new tool call id,
    or tell the user.
    """

    def __init__(
        self, status: int, problem: Mapping[str, Any], *, answers: tuple[str, ...]
    ) -> None:
        self.status = status
        self.problem = dict(problem)
        self.type = str(problem.get("type", "about:blank"))
        self.title = str(problem.get("title", f"HTTP {status}"))
        self.detail = str(problem.get("detail", ""))
        self.code = str(problem.get("code", ""))
        self.answers = answers
        self.attempts = len(answers)
        super().__init__(f"{status} {self.title}: {self.detail}" if self.detail else self.title)


class ToolCallFailed(Exception):
    """Every attempt timed out, lost its connection or found the tool busy or unavailable.

    The tool may or may not have run. Calling again later with the same ``tool_call_id``
    is safe: it runs the tool if it never ran, and returns its stored answer if it did.
    """

    def __init__(self, message: str, *, answers: tuple[str, ...]) -> None:
        last = answers[-1] if answers else "none"
        super().__init__(f"{message}: {len(answers)} attempts, the last one: {last}")
        self.answers = answers
        self.attempts = len(answers)


def idempotency_key(tool_call_id: str) -> str:
    """The ``Idempotency-Key`` header for a tool call: its id, as a Structured Field string.

    An id that cannot be a key (empty, over 255 characters or not printable ASCII) is
    replaced by its SHA-256 digest, which is stable too.
    """
    if not (0 < len(tool_call_id) <= 255 and all(" " <= c <= "~" for c in tool_call_id)):
        tool_call_id = "sha256:" + hashlib.sha256(tool_call_id.encode()).hexdigest()
    escaped = tool_call_id.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def call_tool(
    base_url: str,
    name: str,
    arguments: Mapping[str, Any],
    *,
    tool_call_id: str,
    timeout: float = 30.0,
    max_attempts: int = 5,
    backoff: float = 0.2,
    headers: Mapping[str, str] | None = None,
) -> ToolResult:
    """Call the tool ``name`` with ``arguments``; retry until it answers, at most ``max_attempts``.

    ``timeout`` bounds each attempt's connection and each wait for data. Between attempts
    the client waits a random time up to ``backoff`` seconds, doubled each time up to 2 s
    (exponential backoff with full jitter), or as long as a ``Retry-After`` header says (at
    most 30 s). A ``2xx`` answer is returned; any other ``4xx`` (including ``422`` for a
    tool call id reused with other arguments) and a ``500`` raise :class:`ToolCallError` at
    once; running out of attempts raises :class:`ToolCallFailed`. ``headers`` are sent with
    every attempt (``Authorization``). ``max_attempts`` and ``timeout`` together bound how
    long the call can take.
    """
    policy = RetryPolicy(
        max_attempts=max_attempts,
        deadline=None,  # max_attempts and timeout bound the call
        backoff_base=backoff,
        backoff_cap=MAX_BACKOFF,
        max_retry_after=MAX_RETRY_AFTER,
    )
    # The key is the model's tool call id, never a fresh UUID per attempt. The id is part of
    # the conversation: the assistant message that asked for the call carries it, and every
    # retry of that call (by this client, or by a runtime that restarts and resumes the
    # conversation from its transcript) carries the same one. A new UUID per attempt would
    # make every retry a new operation, and a refund whose answer was lost to a timeout
    # would be issued again.
    with IdempotentClient(policy=policy, timeout=httpx.Timeout(timeout)) as client:
        try:
            answer = client.post(
                f"{base_url.rstrip('/')}/{name}/",
                json={"arguments": dict(arguments)},
                headers={**(headers or {}), "Accept": "application/json"},
                idempotency_key=idempotency_key(tool_call_id),
            )
        except IdempotentRequestError as error:
            problem = _problem(error.response)
            raise ToolCallError(error.status_code, problem, answers=error.history) from None
        except IdempotentClientError as error:
            raise ToolCallFailed(f"{name} did not answer", answers=error.history) from error
    response = answer.response
    return ToolResult(
        _result(response, answer.history), response.status_code, answer.replayed, answer.history
    )


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        return problem
    return {"detail": response.content[:200].decode("utf-8", "replace")}


def _result(response: httpx.Response, answers: tuple[str, ...]) -> Any:
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "result" not in answer:
        problem = {"title": "Malformed tool answer", "detail": 'Expected {"result": ...}.'}
        raise ToolCallError(response.status_code, problem, answers=answers)
    return answer["result"]
