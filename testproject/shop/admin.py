"""Admin for the shop: orders with their payments, and webhook events."""

from __future__ import annotations

from django.contrib import admin

from .models import Order, Payment, WebhookEvent


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
