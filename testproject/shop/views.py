"""The shop's API: orders (a DRF viewset), paying an order, and the payment webhook.

Each one shows an adapter of django-idempotency: the DRF mixin, ``@idempotent`` under DRF's
``@api_view`` (atomic mode), and ``@idempotent`` on a plain async view (lease mode).
"""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, QuerySet
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from rest_framework import status, viewsets
from rest_framework.decorators import api_view, permission_classes
from rest_framework.exceptions import APIException
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from django_idempotency.conf import conf, get_store
from django_idempotency.decorators import idempotent
from django_idempotency.outbox import add_event
from django_idempotency.rest_framework import ConditionalUpdateMixin, IdempotentMixin

from . import carrier
from .models import Order, Payment, Shipment, WebhookEvent
from .serializers import (
    OrderSerializer,
    PaymentSerializer,
    PayRequestSerializer,
    ShipmentSerializer,
    ShipRequestSerializer,
)


class OrderViewSet(IdempotentMixin, ConditionalUpdateMixin, viewsets.ModelViewSet):
    """The caller's own orders. ``POST`` creates one, ``PATCH`` changes an unpaid one.

    Both are covered by ``Idempotency-Key`` (optional here): a retried ``POST`` returns the
    order the first attempt created instead of creating a second one. An order's answers
    carry its ``ETag`` (its version); a ``PATCH`` with ``If-Match`` naming an older version
    answers ``412`` and changes nothing, so two clients cannot overwrite each other's change.
    """

    serializer_class = OrderSerializer
    permission_classes = [IsAuthenticated]
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[Order]:
        # Scoped to the caller, like the idempotency keys themselves.
        return Order.objects.filter(customer=self.request.user)

    def perform_create(self, serializer: BaseSerializer) -> None:
        serializer.save(customer=self.request.user)


class OrderAlreadyPaid(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "order_already_paid"
    default_detail = "This order has already been paid."


def charge_card(amount: Decimal, currency: str, source: str) -> str:
    """A stand-in for a payment provider's API: slow, and it charges every time it is called."""
    time.sleep(settings.SHOP_PAYMENT_PROVIDER_DELAY.total_seconds())
    return f"ch_{uuid.uuid4().hex[:24]}"


@api_view(["POST"])
@permission_classes([IsAuthenticated])
@idempotent(required=True)
def pay_order(request: Request, pk: int) -> Response:
    """Charge an order's amount, once per ``Idempotency-Key`` (which is required here).

    ``@idempotent`` sits below ``@api_view`` so that DRF has authenticated the caller before
    the key is scoped to them. The view runs in the atomic mode: the payment, the order's new
    status, its ``shop.order_paid`` outbox event and the stored response commit together or
    not at all. The price is a transaction held open for as long as the provider takes; for a
    provider slow enough that this matters, ``@idempotent(required=True, atomic=False)`` (the
    lease mode) holds none.
    """
    body = PayRequestSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    with transaction.atomic():
        # Lock the order too, so two payments under *different* keys cannot both find it
        # unpaid (the idempotency key only guards retries of one payment).
        order = get_object_or_404(Order.objects.select_for_update(), pk=pk, customer=request.user)
        if order.status == Order.Status.PAID:
            raise OrderAlreadyPaid()
        reference = charge_card(order.amount, order.currency, body.validated_data["source"])
        payment = Payment.objects.create(order=order, amount=order.amount, reference=reference)
        order.status = Order.Status.PAID
        order.version = F("version") + 1  # a change: ETags handed out before go stale
        order.save(update_fields=["status", "version"])
        # Commits with the payment, or not at all; the outbox relay publishes it later.
        add_event(
            "shop.order_paid",
            {"order": order.pk, "payment": payment.pk, "amount": str(payment.amount)},
        )
    return Response(PaymentSerializer(payment).data, status=status.HTTP_201_CREATED)


class OrderNotPaid(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "order_not_paid"
    default_detail = "Only a paid order can be shipped."


@api_view(["POST"])
@permission_classes([IsAuthenticated])
@idempotent(required=True, atomic=False)
def ship_order(request: Request, pk: int) -> Response:
    """Ship a paid order in phases: buy the carrier's label, then book the shipment.

    The lease mode with phases (docs/phases.md): each phase commits with its recovery point,
    so a retry after a crash resumes after the last one instead of buying a second label, and
    the label is bought with a key derived from the request's (``run.foreign_key``), which the
    carrier deduplicates. Each phase names the compensation that undoes it
    (``shop/compensations.py``). The demo's carrier never has a same-day courier: the view
    then calls ``run.compensate()``, which cancels the shipment and voids the label, and
    answers 409, which retries get again. A request whose worker died between the phases is
    undone by ``python manage.py idempotency_abandoned --compensate``.
    """
    if not getattr(get_store(), "supports_phases", False):
        # The demo also runs with IDEMPOTENCY_STORE=CacheStore, which keeps no recovery points.
        return Response(
            {"detail": f"Shipping needs the DatabaseStore, not {conf.IDEMPOTENCY_STORE}."},
            status=status.HTTP_501_NOT_IMPLEMENTED,
        )
    body = ShipRequestSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    service = body.validated_data["service"]
    order = get_object_or_404(Order, pk=pk, customer=request.user)
    if order.status != Order.Status.PAID:
        raise OrderNotPaid()
    run = request.idempotency
    label = run.phase(
        "label",
        lambda: carrier.buy_label(order.pk, service, idempotency_key=run.foreign_key("label")),
        atomic=False,  # a call to another service: it cannot join a transaction
        compensate="shop.void-label",
    )
    shipment_id = run.phase(
        "shipment",
        lambda: Shipment.objects.create(order=order, label=label, service=service).pk,
        compensate="shop.cancel-shipment",
    )
    if service == "same-day":
        run.compensate()  # cancel the shipment, then void the label
        return Response(
            {"detail": "No same-day courier today: the shipment was cancelled, its label voided."},
            status=status.HTTP_409_CONFLICT,
        )
    shipment = Shipment.objects.get(pk=shipment_id)
    return Response(ShipmentSerializer(shipment).data, status=status.HTTP_201_CREATED)


@csrf_exempt
@require_POST
@idempotent
async def payment_webhook(request: HttpRequest) -> JsonResponse:
    """Record an event delivered by the payment provider, once per ``Idempotency-Key``.

    Providers redeliver an event until they see a 2xx, and send the event id as the key.
    Async views run in the lease mode: the key is claimed in one short transaction, the view
    runs outside any transaction, and the response is stored in another. A real webhook would
    check the provider's signature first; the demo keeps it open.
    """
    try:
        event: Any = json.loads(request.body)
        event_id, event_type = str(event["id"]), str(event["type"])
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"detail": 'Expected a JSON object with "id" and "type".'}, status=400)
    row = await WebhookEvent.objects.acreate(event_id=event_id, type=event_type, payload=event)
    return JsonResponse({"received": event_id, "event": row.pk}, status=202)
