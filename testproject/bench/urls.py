"""URLs of django-idempotency's benchmark server (``bench.settings``)."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("bench/ping/", views.ping),
    path("bench/baseline/", views.baseline),
    path("bench/atomic/", views.atomic),
    path("bench/lease/", views.lease),
    path("bench/realistic/baseline/", views.realistic_baseline),
    path("bench/realistic/atomic/", views.realistic_atomic),
]
