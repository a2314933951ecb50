"""``manage.py agent_demo``: an agent's refund tool call, retried through timeouts, refunds once.

Narrated, over real HTTP: against the server given with ``--url``, or else the project's own
WSGI application served from a background thread on a free local port. The client is the
one an agent runtime would use (``agent/client.py``). Exits with status 1 when an
expectation fails, so CI can run it as a check.
"""

from __future__ import annotations

import textwrap
import threading
import uuid
from contextlib import nullcontext
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from shop.management.commands.idempotency_demo import quiet_client_errors, serve

from ...client import ToolCallError, ToolResult, call_tool

WIDTH = 92


class Command(BaseCommand):
    help = (
        "Narrate an agent calling the issue_refund tool with a timeout shorter than the "
        "refund takes: the client retries with the tool call id as its Idempotency-Key, and "
        "the refund is issued once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--url",
            help="base URL of a running demo server (http://127.0.0.1:8000); by default the "
            "command serves the project itself",
        )
        parser.add_argument(
            "--delay", type=float, default=2.0, help="seconds the refund takes (2.0, at most 5)"
        )
        parser.add_argument(
            "--timeout", type=float, default=0.7, help="the client's timeout per attempt (0.7)"
        )

    def handle(self, *, url: str | None, delay: float, timeout: float, **options: Any) -> None:
        self.failures: list[str] = []
        with quiet_client_errors(), serve() if url is None else nullcontext(url) as base_url:
            tools = f"{base_url.rstrip('/')}/agent/tools"
            self.say(f"The agent's tools are at {tools}/.")
            self.one_call_retried(tools, delay, timeout)
            self.agents_at_once(tools, delay, timeout)
            self.reused_id(tools)
        if self.failures:
            raise CommandError(f"{len(self.failures)} expectation(s) failed: {self.failures}")
        self.stdout.write(self.style.SUCCESS("Every refund was issued exactly once."))

    def one_call_retried(self, tools: str, delay: float, timeout: float) -> None:
        order_id, tool_call_id = _new_call()
        self.heading("1. One tool call, a timeout shorter than the refund")
        self.say(
            f"The model asks for issue_refund (tool call id {tool_call_id}). The refund takes "
            f"{delay:g} s; the runtime waits {timeout:g} s per attempt, then retries with the "
            "same tool call id as its Idempotency-Key."
        )
        answer = self.refund(tools, order_id, tool_call_id, delay=delay, timeout=timeout)
        self.show(answer)
        refunds = self.refunds(tools, order_id)
        self.say(f"Refunds for {order_id}: {len(refunds)}.")
        self.expect(len(refunds) == 1, f"one refund for {order_id}, found {len(refunds)}")
        self.expect(answer.replayed, "the final answer was the stored answer")
        self.expect(refunds[:1] == [answer.result], "the client got the first attempt's refund")

        self.say("The runtime restarts and resumes the conversation: it sends the call again.")
        again = self.refund(tools, order_id, tool_call_id, delay=delay, timeout=delay + 5)
        self.show(again)
        self.expect(again.result == answer.result, "the resumed call got the same refund")
        self.expect(len(self.refunds(tools, order_id)) == 1, "still one refund")

    def agents_at_once(self, tools: str, delay: float, timeout: float) -> None:
        self.heading("2. Four agents at once, each with its own tool call")
        calls = [_new_call() for _ in range(4)]
        answers: dict[str, ToolResult | Exception] = {}

        def agent(order_id: str, tool_call_id: str) -> None:
            try:
                answers[order_id] = self.refund(
                    tools, order_id, tool_call_id, delay=delay, timeout=timeout
                )
            except Exception as exc:  # reported below
                answers[order_id] = exc

        threads = [threading.Thread(target=agent, args=call) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for order_id, _ in calls:
            answer = answers[order_id]
            count = len(self.refunds(tools, order_id))
            if isinstance(answer, Exception):
                self.expect(False, f"{order_id}: {answer}")
                continue
            self.say(f"{order_id}: {count} refund, after {' / '.join(answer.answers)}")
            self.expect(count == 1, f"one refund for {order_id}, found {count}")

    def reused_id(self, tools: str) -> None:
        self.heading("3. A tool call id reused with other arguments")
        order_id, tool_call_id = _new_call()
        self.refund(tools, order_id, tool_call_id, delay=0, timeout=10)
        self.say(f"The same id {tool_call_id} with another amount:")
        try:
            call_tool(
                tools,
                "issue_refund",
                {"order_id": order_id, "amount": "99.00"},
                tool_call_id=tool_call_id,
                timeout=10,
            )
        except ToolCallError as error:
            self.say(f"ToolCallError, not retried: {error}")
            self.expect(error.status == 422, f"422 for a reused id, got {error.status}")
        else:
            self.expect(False, "a reused tool call id was refused")
        self.expect(len(self.refunds(tools, order_id)) == 1, "still one refund")

    # -- Helpers ---------------------------------------------------------------------------

    def refund(
        self, tools: str, order_id: str, tool_call_id: str, *, delay: float, timeout: float
    ) -> ToolResult:
        return call_tool(
            tools,
            "issue_refund",
            {"order_id": order_id, "amount": "25.00", "reason": "parcel lost"},
            tool_call_id=tool_call_id,
            timeout=timeout,
            max_attempts=12,
            headers={"X-Demo-Delay": str(delay)},
        )

    def refunds(self, tools: str, order_id: str) -> list[dict[str, Any]]:
        answer = call_tool(
            tools, "list_refunds", {"order_id": order_id}, tool_call_id="read", timeout=10
        )
        refunds: list[dict[str, Any]] = answer.result["refunds"]
        return refunds

    def show(self, answer: ToolResult) -> None:
        for number, seen in enumerate(answer.answers, 1):
            self.stdout.write(f"    attempt {number}: {seen}")
        self.stdout.write(f"    result: {answer.result['refund_id']} ({answer.result['amount']})")

    def heading(self, text: str) -> None:
        self.stdout.write("\n" + self.style.MIGRATE_HEADING(text))

    def say(self, text: str) -> None:
        self.stdout.write(textwrap.fill(text, WIDTH))

    def expect(self, condition: bool, what: str) -> None:
        if not condition:
            self.failures.append(what)
            self.stderr.write(self.style.ERROR(f"    FAILED: {what}"))


def _new_call() -> tuple[str, str]:
    return f"ord_{uuid.uuid4().hex[:10]}", f"call_{uuid.uuid4().hex[:24]}"
