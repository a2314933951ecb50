"""One row per execution of a benchmark view: the server-side count of executions per key."""

from __future__ import annotations

from django.db import models


class Execution(models.Model):
    """Written by every run of the endpoint's own work, and by nothing else.

    Deliberately not unique on ``key``: the benchmark counts rows per key to see whether an
    idempotency layer let the same key run twice.
    """

    key = models.CharField(max_length=255, db_index=True)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"execution of {self.key}"
