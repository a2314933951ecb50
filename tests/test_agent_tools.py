"""The demo project's agent tools: a tool-calling client retries through timeouts, one refund.

docs/agents.md: an agent runtime calls the ``issue_refund`` tool (``testproject/agent``) through
``testproject/agent/client.py``, with the model's tool call id as the ``Idempotency-Key`` and
a timeout shorter than the refund takes. The client gives up on its first attempt and tries
again; the refund is issued once and the client ends with its stored answer.

The demo project runs under a real gunicorn (sync worker processes, ``tests/reliability_support``)
on a database of its own, migrated once for the module: an SQLite file, or a database created
beside the test database on PostgreSQL and MariaDB. The tests count refunds through the
project's read-only ``list_refunds`` tool, and never import the project's Django code; only
its client, which needs nothing but the standard library.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.db import connection

from tests.reliability_support import Server

ROOT = Path(__file__).resolve().parent.parent
TESTPROJECT = ROOT / "testproject"
#: Seconds the refund takes (the tool's ``X-Demo-Delay``) and the client's timeout per attempt.
DELAY, CLIENT_TIMEOUT = 1.5, 0.5
#: ``@idempotent(wait=...)`` on the tool: how long a retry waits for the running refund.
SERVER_WAIT = 1.0

if not (TESTPROJECT / "agent" / "client.py").exists():
    pytest.skip(
        "the demo project is not beside the tests (a tox run tests the wheel)",
        allow_module_level=True,
    )
if find_spec("rest_framework") is None:
    pytest.skip("the demo project needs Django REST Framework", allow_module_level=True)

row_locks = pytest.mark.skipif(
    not connection.features.has_select_for_update,
    reason="SQLite has no row locks: a retry queues for the write lock instead of a 409",
)


def _demo_environment(database_url: str) -> dict[str, str]:
    """The demo project's settings, on its own database, with the database store."""
    return {
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PYTHONPATH": os.pathsep.join([str(TESTPROJECT), str(ROOT)]),
        "DATABASE_URL": database_url,
        "DJANGO_DEBUG": "0",
        "IDEMPOTENCY_STORE": "django_idempotency.stores.DatabaseStore",
        "IDEMPOTENCY_REPLAY_CACHE": "",
        "REDIS_URL": "",  # the demo's cache stays local: no key of its own in the suite's Redis
    }


def _load_client() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_client", TESTPROJECT / "agent/client.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


agent = _load_client()


class DemoServer(Server):
    """``Server`` serving the demo project (``testproject.settings``) instead of the tests'."""

    @property
    def tools(self) -> str:
        return f"http://127.0.0.1:{self.port}/agent/tools"


@pytest.fixture(scope="module")
def demo_database(tmp_path_factory, django_db_setup, django_db_blocker) -> Iterator[str]:
    """``DATABASE_URL`` of a database of the demo project's own, migrated."""
    if connection.vendor == "sqlite":
        path = tmp_path_factory.mktemp("agent-db") / "demo.sqlite3"
        url = f"sqlite:///{path}"
    else:
        name = f"{connection.settings_dict['NAME']}_agent"
        url = urlunsplit(urlsplit(os.environ["DATABASE_URL"])._replace(path=f"/{name}"))
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {connection.ops.quote_name(name)}")
            cursor.execute(f"CREATE DATABASE {connection.ops.quote_name(name)}")
    result = subprocess.run(
        [sys.executable, str(TESTPROJECT / "manage.py"), "migrate", "--no-input", "-v", "0"],
        cwd=ROOT,
        env={**os.environ, **_demo_environment(url)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    yield url
    if connection.vendor != "sqlite":
        # The workers are gone, but PostgreSQL may not have seen their sessions end yet.
        force = " WITH (FORCE)" if connection.vendor == "postgresql" else ""
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {connection.ops.quote_name(name)}{force}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_database) -> Iterator[DemoServer]:
    environment = _demo_environment(demo_database)
    demo = DemoServer(
        tmp_path_factory.mktemp("agent-server"),
        workers=4,
        settings=environment.pop("DJANGO_SETTINGS_MODULE"),
        ready_path="/agent/tools/",  # the demo project has no /ready/
        **environment,
    )
    try:
        yield demo
    finally:
        demo.stop()


def _new_call() -> tuple[str, str]:
    """A new order id and a new tool call id, shaped like a model's."""
    return f"ord_{uuid.uuid4().hex[:10]}", f"call_{uuid.uuid4().hex[:24]}"


def _refunds(server: DemoServer, order_id: str) -> list[dict[str, Any]]:
    answer = agent.call_tool(
        server.tools, "list_refunds", {"order_id": order_id}, tool_call_id="read", timeout=10
    )
    return answer.result["refunds"]


def _slow_refund(server: DemoServer, order_id: str, tool_call_id: str, **options: Any) -> Any:
    options = {"timeout": CLIENT_TIMEOUT, "max_attempts": 12, **options}
    return agent.call_tool(
        server.tools,
        "issue_refund",
        {"order_id": order_id, "amount": "25.00", "reason": "parcel lost"},
        tool_call_id=tool_call_id,
        headers={"X-Demo-Delay": str(options.pop("delay", DELAY))},
        **options,
    )


def test_a_tool_call_retried_through_timeouts_refunds_once(server):
    order_id, tool_call_id = _new_call()

    answer = _slow_refund(server, order_id, tool_call_id)

    [refund] = _refunds(server, order_id)
    assert answer.result == refund  # the first attempt's refund, which the client gave up on
    assert answer.status == 201
    assert answer.answers[0] == "timeout"
    assert answer.attempts > 1
    assert answer.replayed, answer.answers


def test_the_same_tool_call_sent_again_later_gets_the_stored_answer(server):
    # A runtime that crashed after the call and resumes the conversation from its transcript
    # sends the pending tool call again, with its id.
    order_id, tool_call_id = _new_call()
    first = _slow_refund(server, order_id, tool_call_id, delay=0, timeout=10)

    again = _slow_refund(server, order_id, tool_call_id, delay=0, timeout=10)

    assert first.answers == ("201",)
    assert again.answers == ("201 replayed",)
    assert again.result == first.result
    assert len(_refunds(server, order_id)) == 1


@row_locks
def test_a_retry_that_outwaits_the_server_gets_409_and_comes_back_after_retry_after(server):
    # The first attempt times out after 1.5 s; the second waits SERVER_WAIT for the first on
    # the server and is answered 409 with Retry-After: 1 at about 2.7 s, before the refund
    # ends at 3.2 s. The third, a second later, gets the stored answer.
    order_id, tool_call_id = _new_call()

    answer = _slow_refund(server, order_id, tool_call_id, delay=3.2, timeout=1.5)

    assert answer.answers[:2] == ("timeout", "409 idempotency_key_in_progress")
    assert answer.answers[-1] == "201 replayed"
    assert len(_refunds(server, order_id)) == 1


def test_concurrent_agents_each_refund_once(server):
    calls = [_new_call() for _ in range(4)]
    answers: dict[str, Any] = {}

    def run_agent(order_id: str, tool_call_id: str) -> None:
        try:
            answers[order_id] = _slow_refund(server, order_id, tool_call_id, delay=1.0)
        except Exception as exc:  # reported by the assertions below
            answers[order_id] = exc

    threads = [threading.Thread(target=run_agent, args=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    for order_id, _ in calls:
        answer = answers[order_id]
        assert isinstance(answer, agent.ToolResult), answer
        [refund] = _refunds(server, order_id)
        assert answer.result == refund
        assert answer.attempts > 1
        assert answer.replayed, answer.answers
    assert len({answer.result["refund_id"] for answer in answers.values()}) == len(calls)


def test_a_tool_call_id_reused_with_other_arguments_is_an_error_not_retried(server):
    order_id, tool_call_id = _new_call()
    _slow_refund(server, order_id, tool_call_id, delay=0, timeout=10)

    with pytest.raises(agent.ToolCallError) as caught:
        agent.call_tool(
            server.tools,
            "issue_refund",
            {"order_id": order_id, "amount": "99.00"},
            tool_call_id=tool_call_id,
            timeout=10,
        )

    error = caught.value
    assert error.status == 422
    assert error.type.endswith("/docs/errors.md#idempotency_key_mismatch")
    assert error.code == "idempotency_key_mismatch"
    assert error.title == "Idempotency key reused"
    assert error.answers == ("422 idempotency_key_mismatch",)
    assert str(error).startswith("422 Idempotency key reused: ")
    assert len(_refunds(server, order_id)) == 1


def test_invalid_arguments_are_an_error_not_retried(server):
    order_id, tool_call_id = _new_call()

    with pytest.raises(agent.ToolCallError) as caught:
        agent.call_tool(
            server.tools,
            "issue_refund",
            {"order_id": order_id, "amount": "-5"},
            tool_call_id=tool_call_id,
            timeout=10,
        )

    assert caught.value.status == 400
    assert caught.value.type == "tag:django-idempotency-demo,2026:invalid_arguments"
    assert caught.value.attempts == 1
    assert _refunds(server, order_id) == []


def test_the_refund_tool_requires_a_key(server):
    body = b'{"arguments": {"order_id": "ord_1", "amount": "1.00"}}'

    answer = server.request(
        "POST", "/agent/tools/issue_refund/", body, **{"Content-Type": "application/json"}
    )

    assert answer.status == 400
    assert b"idempotency_key_missing" in answer.content


# -- The client alone --------------------------------------------------------------------------


def test_the_key_is_the_tool_call_id_as_a_structured_field_string():
    assert agent.idempotency_key("call_7fQ2kX9bV1") == '"call_7fQ2kX9bV1"'
    assert agent.idempotency_key('a"b\\c, d') == '"a\\"b\\\\c, d"'


def test_a_tool_call_id_that_cannot_be_a_key_is_replaced_by_its_digest():
    long_id = "x" * 256

    assert agent.idempotency_key(long_id) == agent.idempotency_key(long_id)
    assert agent.idempotency_key(long_id).startswith('"sha256:')
    assert agent.idempotency_key("appel-à-outil").startswith('"sha256:')


def test_the_client_gives_up_after_max_attempts_when_nothing_answers():
    with pytest.raises(agent.ToolCallFailed) as caught:
        agent.call_tool(
            "http://127.0.0.1:9/agent/tools",  # the discard port: nothing listens
            "issue_refund",
            {},
            tool_call_id="call_1",
            max_attempts=2,
            backoff=0,
        )

    assert caught.value.attempts == 2
    assert caught.value.answers == ("ConnectError", "ConnectError")
