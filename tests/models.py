"""Models the test views write to, so tests can count side effects."""

from __future__ import annotations

from django.db import models


class Charge(models.Model):
    """One row per execution of a view that "charges" a customer."""

    amount = models.IntegerField()
    note = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"charge {self.pk} of {self.amount}"


class Document(models.Model):
    """A versioned resource, updated conditionally (``If-Match``) by tests/conditional_views."""

    title = models.CharField(max_length=100)
    version = models.PositiveIntegerField(default=1)

    def __str__(self) -> str:
        return f"document {self.pk} at version {self.version}"
