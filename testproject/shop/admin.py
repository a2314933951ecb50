"""Admin for the shop: orders with their payments, and webhook events."""

from __future__ import annotations

from django.contrib import admin

from .models import CarrierLabel, Order, Payment, Shipment, WebhookEvent


class PaymentInline(admin.TabularInline):
    model = Payment
    extra = 0
    readonly_fields = ["amount", "reference", "created"]


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ["id", "customer", "amount", "currency", "status", "created"]
    list_filter = ["status", "currency"]
    search_fields = ["customer__username"]
    inlines = [PaymentInline]


@admin.register(WebhookEvent)
class WebhookEventAdmin(admin.ModelAdmin):
    list_display = ["event_id", "type", "received"]
    search_fields = ["event_id"]


@admin.register(Shipment)
class ShipmentAdmin(admin.ModelAdmin):
    list_display = ["id", "order", "label", "service", "status", "created"]
    list_filter = ["status", "service"]


@admin.register(CarrierLabel)
class CarrierLabelAdmin(admin.ModelAdmin):
    list_display = ["label", "order_id", "voided", "created"]
    list_filter = ["voided"]
