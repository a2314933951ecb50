"""The agent tools' effects: refunds issued by the ``issue_refund`` tool."""

from __future__ import annotations

from django.db import models


class Refund(models.Model):
    """One refund issued to a customer. Two rows for one tool call is the bug we prevent.

    ``tool_call_id`` is deliberately not unique: the demo counts rows to show that the
    idempotency layer alone keeps a retried tool call from refunding twice. A real project
    would add the constraint too.
    """

    reference = models.CharField("refund reference", max_length=64, unique=True)
    order_id = models.CharField("order", max_length=64, db_index=True)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    reason = models.CharField(max_length=200, blank=True)
    tool_call_id = models.CharField("tool call id", max_length=255, db_index=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created", "pk"]

    def __str__(self) -> str:
        return f"Refund {self.reference} of {self.amount} {self.currency} on {self.order_id}"
