"""The endpoints' own work, shared by every variant: one INSERT and a small JSON answer, or
(``create_order_realistic``) three queries and a DRF serializer each way."""

from __future__ import annotations

from rest_framework import serializers, status
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


class OrderRequestSerializer(serializers.Serializer):
    sku = serializers.CharField(max_length=32)
    quantity = serializers.IntegerField(min_value=1, max_value=100)
    customer = serializers.CharField(max_length=32)


class ExecutionSerializer(serializers.ModelSerializer):
    class Meta:
        model = Execution
        fields = ["id", "key", "created"]


def create_order_realistic(request: Request) -> Response:
    """A creation endpoint as APIs have them: validate the body, read, insert, update, answer
    with a model serializer. Three queries, one of them the counted execution."""
    order = OrderRequestSerializer(data=request.data)
    order.is_valid(raise_exception=True)
    key = request.headers.get("Idempotency-Key", "")
    Execution.objects.filter(key=key).exists()  # say, the customer's open orders
    execution = Execution.objects.create(key=key)
    Execution.objects.filter(pk=execution.pk).update(created=execution.created)  # say, a total
    response = Response(
        {"order": ExecutionSerializer(execution).data, **order.validated_data},
        status=status.HTTP_201_CREATED,
    )
    response["Location"] = f"/orders/{execution.pk}/"
    return response
