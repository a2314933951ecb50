"""A tool-calling client, as an agent runtime has one: it calls a tool over HTTP and retries.

``call_tool()`` sends one tool call of the model to ``POST <base_url>/<name>/`` with
``{"arguments": {...}}`` and returns the ``{"result": ...}`` it gets back. It retries through
timeouts, dropped connections, ``409 idempotency_key_in_progress`` and ``502``/``503``/``504``,
always with the same ``Idempotency-Key``, so the tool's effect happens once however often
the call is sent. Standard library only, so it runs wherever the runtime does::

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

import email.utils
import hashlib
import http.client
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

#: Answers worth another attempt with the same key: the operation may not have run, or may
#: still be running, and a retry either runs it or gets its stored answer.
RETRIED_STATUSES = frozenset({502, 503, 504})
IN_PROGRESS = "idempotency_key_in_progress"
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

    def __init__(self, status: int, problem: Mapping[str, Any], *, answers: list[str]) -> None:
        self.status = status
        self.problem = dict(problem)
        self.type = str(problem.get("type", "about:blank"))
        self.title = str(problem.get("title", f"HTTP {status}"))
        self.detail = str(problem.get("detail", ""))
        self.code = str(problem.get("code", ""))
        self.answers = tuple(answers)
        self.attempts = len(answers)
        super().__init__(f"{status} {self.title}: {self.detail}" if self.detail else self.title)


class ToolCallFailed(Exception):
    """Every attempt timed out, lost its connection or found the tool busy or unavailable.

    The tool may or may not have run. Calling again later with the same ``tool_call_id``
    is safe: it runs the tool if it never ran, and returns its stored answer if it did.
    """

    def __init__(self, message: str, *, answers: list[str]) -> None:
        super().__init__(f"{message}: {len(answers)} attempts, the last one: {answers[-1]}")
        self.answers = tuple(answers)
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
    the client sleeps ``backoff`` seconds, doubled each time up to 2 s, with jitter, or as
    long as a ``Retry-After`` header says (at most 30 s). A ``2xx`` answer is returned; any other
    ``4xx`` (including ``422`` for a tool call id reused with other arguments) and a
    ``500`` raise :class:`ToolCallError` at once; running out of attempts raises
    :class:`ToolCallFailed`. ``headers`` are sent with every attempt (``Authorization``).
    ``max_attempts`` and ``timeout`` together bound how long the call can take.
    """
    url = f"{base_url.rstrip('/')}/{name}/"
    body = json.dumps({"arguments": dict(arguments)}).encode()
    request_headers = {
        **(headers or {}),
        "Content-Type": "application/json",
        "Accept": "application/json",
        # The key is the model's tool call id, never a fresh UUID per attempt. The id is part
        # of the conversation: the assistant message that asked for the call carries it, and
        # every retry of that call (by this loop, or by a runtime that restarts and resumes
        # the conversation from its transcript) carries the same one. A new UUID per attempt
        # would make every retry a new operation, and a refund whose answer was lost to a
        # timeout would be issued again.
        "Idempotency-Key": idempotency_key(tool_call_id),
    }
    answers: list[str] = []
    for attempt in range(1, max_attempts + 1):
        retry_after: float | None = None
        request = urllib.request.Request(url, body, request_headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, content = response.status, response.read()
                replayed = response.headers.get("Idempotent-Replayed", "") == "true"
        except urllib.error.HTTPError as error:
            with error:
                status, content = error.code, error.read()
                retry_after = _retry_after(error.headers.get("Retry-After"))
            problem = _problem(content)
            answers.append(f"{status} {problem.get('code', '')}".strip())
            if not _worth_retrying(status, problem):
                raise ToolCallError(status, problem, answers=answers) from None
        except TimeoutError:
            answers.append("timeout")
        except (ConnectionError, http.client.HTTPException) as error:
            answers.append(type(error).__name__)  # the connection dropped mid-answer
        except urllib.error.URLError as error:  # no connection: refused, unreachable, timeout
            timed_out = isinstance(error.reason, TimeoutError)
            answers.append("timeout" if timed_out else f"URLError {error.reason}")
        else:
            answers.append(f"{status} replayed" if replayed else str(status))
            return ToolResult(_result(status, content, answers), status, replayed, tuple(answers))
        if attempt < max_attempts:
            pause = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF) * random.uniform(0.5, 1.0)
            time.sleep(max(pause, min(retry_after or 0.0, MAX_RETRY_AFTER)))
    raise ToolCallFailed(f"{name} did not answer", answers=answers)


def _worth_retrying(status: int, problem: Mapping[str, Any]) -> bool:
    if status == 409:
        # Only "still running" ends by itself. Another 409 (a response too large to have been
        # stored, the tool's own conflict) would be answered the same way every time.
        return problem.get("code") == IN_PROGRESS
    return status in RETRIED_STATUSES


def _problem(content: bytes) -> dict[str, Any]:
    try:
        problem = json.loads(content)
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        return problem
    return {"detail": content[:200].decode("utf-8", "replace")}


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        seconds = email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)
    except (TypeError, ValueError):  # not a date, or one without a time zone
        return None
    return max(0.0, seconds.total_seconds())


def _result(status: int, content: bytes, answers: list[str]) -> Any:
    try:
        answer = json.loads(content)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "result" not in answer:
        problem = {"title": "Malformed tool answer", "detail": 'Expected {"result": ...}.'}
        raise ToolCallError(status, problem, answers=answers)
    return answer["result"]
