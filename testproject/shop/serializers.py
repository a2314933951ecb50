"""DRF serializers of the shop's API."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rest_framework import serializers

from .models import Order, Payment, Shipment


class OrderSerializer(serializers.HyperlinkedModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="order-detail")
    customer = serializers.CharField(source="customer.username", read_only=True)
    amount = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=Decimal("0.01"))
    currency = serializers.ChoiceField(choices=["EUR", "USD", "GBP"], default="EUR")

    class Meta:
        model = Order
        fields = ["url", "id", "customer", "amount", "currency", "status", "created", "version"]
        read_only_fields = ["status", "created", "version"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.instance is not None and self.instance.status == Order.Status.PAID:
            raise serializers.ValidationError("A paid order cannot be changed.")
        return attrs


class PayRequestSerializer(serializers.Serializer):
    """The body of a payment: which card (a provider token) to charge."""

    source = serializers.CharField(max_length=64, default="tok_visa")


class PaymentSerializer(serializers.ModelSerializer):
    currency = serializers.CharField(source="order.currency", read_only=True)

    class Meta:
        model = Payment
        fields = ["id", "order", "amount", "currency", "reference", "created"]


class ShipRequestSerializer(serializers.Serializer):
    service = serializers.ChoiceField(choices=["standard", "same-day"], default="standard")


class ShipmentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Shipment
        fields = ["id", "order", "label", "service", "status", "created"]
