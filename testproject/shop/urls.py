"""URLs of the shop's API, mounted at ``/api/``."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import DefaultRouter

from .views import OrderViewSet, pay_order, payment_webhook, ship_order

router = DefaultRouter()
router.register("orders", OrderViewSet, basename="order")

urlpatterns = [
    path("orders/<int:pk>/pay/", pay_order, name="order-pay"),
    path("orders/<int:pk>/ship/", ship_order, name="order-ship"),
    path("webhooks/", payment_webhook, name="webhooks"),
    *router.urls,
]
