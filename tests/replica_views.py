"""URLs of the app that tests/test_replicas.py serves: the reliability views, and the admin's
list of keys (``/admin-keys/``), rendered by the real ``IdempotencyKeyAdmin`` for a superuser
that exists only in memory (no login, no session)."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth.models import User
from django.urls import path

from django_idempotency.models import IdempotencyKey
from tests.reliability_views import urlpatterns as reliability_urlpatterns


def admin_keys(request):
    request.user = User(username="operator", is_active=True, is_staff=True, is_superuser=True)
    response = admin.site._registry[IdempotencyKey].changelist_view(request)
    response.render()
    return response


urlpatterns = [
    *reliability_urlpatterns,
    path("admin-keys/", admin_keys),
    path("admin/", admin.site.urls),  # the changelist links to the admin's other pages
]
