"""The endpoint's own work, shared by every variant: one INSERT and a small JSON answer."""

from __future__ import annotations

from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from .models import Execution


def create_order(request: Request) -> Response:
    """Record one execution and answer like a typical creation endpoint (about 250 bytes)."""
    key = request.headers.get("Idempotency-Key", "")
    execution = Execution.objects.create(key=key)
    response = Response(
        {
            "id": execution.pk,
            "status": "created",
            "sku": "BOOK-1",
            "quantity": 2,
            "customer": "c-4242",
            "total": {"amount": "39.80", "currency": "EUR"},
            "lines": [{"sku": "BOOK-1", "price": "19.90", "quantity": 2}],
        },
        status=status.HTTP_201_CREATED,
    )
    response["Location"] = f"/orders/{execution.pk}/"
    return response
