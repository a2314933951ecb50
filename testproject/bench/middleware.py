"""Counts the SQL statements each request sends and returns the count in a response header.

Installed outermost, so it sees every query of the idempotency layer (middleware or view
wrapper) and of the view; the header is added after any layer has stored the response, so it is
never stored or replayed. The cost (one wrapper call per statement) is the same for every
package and for the baseline. ``BEGIN``/``COMMIT`` are not statements Django executes through a
cursor, so they are not counted; savepoints are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import connection
from django.http import HttpRequest, HttpResponseBase

HEADER = "X-Bench-Queries"


class QueryCountMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        count = 0

        def counter(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            nonlocal count
            count += 1
            return execute(sql, params, many, context)

        with connection.execute_wrapper(counter):
            response = self.get_response(request)
        response[HEADER] = str(count)
        return response
