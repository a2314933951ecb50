"""Assertions shared by the test modules."""

from __future__ import annotations

import json
import os

#: Set by scripts/pgbouncer.sh's test run: the suite's PostgreSQL connections go through
#: PgBouncer in transaction pooling mode, so the server sessions are not the clients' own.
BEHIND_PGBOUNCER = os.environ.get("IDEMPOTENCY_TEST_PGBOUNCER") == "1"


def assert_problem(response, status: int, code: str) -> dict:
    """Assert an RFC 9457 problem+json answer of this layer; return its body."""
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = json.loads(response.content)
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"]
    assert body["title"]
    assert body["detail"]
    assert not response.has_header("Idempotent-Replayed")
    return body
