"""The shop's models: a customer's orders, the payments charged for them, webhook events."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Order(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        PAID = "paid", "paid"

    customer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="orders"
    )
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3, default="EUR")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    created = models.DateTimeField(auto_now_add=True)
    #: Incremented by every change (ConditionalUpdateMixin, and pay_order): the ETag.
    version = models.PositiveIntegerField(default=1)

    class Meta:
        ordering = ["-created", "-pk"]

    def __str__(self) -> str:
        return f"Order {self.pk} ({self.amount} {self.currency}, {self.status})"


class Payment(models.Model):
    """One charge at the payment provider. Two rows for one order is the bug we prevent."""

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="payments")
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    reference = models.CharField("provider reference", max_length=64)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created", "pk"]

    def __str__(self) -> str:
        return f"Payment {self.reference} of {self.amount}"


class Shipment(models.Model):
    """A parcel of a paid order, booked by ``ship_order`` with a label from the carrier."""

    class Status(models.TextChoices):
        BOOKED = "booked", "booked"
        CANCELLED = "cancelled", "cancelled"

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="shipments")
    label = models.CharField("carrier label", max_length=64)
    service = models.CharField(max_length=16)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.BOOKED)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created", "pk"]

    def __str__(self) -> str:
        return f"Shipment {self.label} ({self.status})"


class CarrierLabel(models.Model):
    """The fake carrier's own record of a label (``shop.carrier``): its side, not the shop's."""

    label = models.CharField(max_length=64, unique=True)
    order_id = models.PositiveIntegerField()
    voided = models.BooleanField(default=False)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.label}{' (voided)' if self.voided else ''}"


class WebhookEvent(models.Model):
    """An event delivered by the payment provider's webhook.

    ``event_id`` is deliberately not unique: the demo counts rows to show that the idempotency
    layer alone keeps redelivered events out. A real project would add the constraint too.
    """

    event_id = models.CharField(max_length=255, db_index=True)
    type = models.CharField(max_length=64)
    payload = models.JSONField()
    received = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-received", "-pk"]

    def __str__(self) -> str:
        return f"{self.type} {self.event_id}"
