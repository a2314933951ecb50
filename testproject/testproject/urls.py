"""URLs of the demo project: the admin, the shop's API and a redirect from ``/`` to it."""

from __future__ import annotations

from django.apps import apps
from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(url="/api/", permanent=False)),
    path("admin/", admin.site.urls),
    path("api/", include("shop.urls")),
    path("api-auth/", include("rest_framework.urls")),
    path("agent/", include("agent.urls")),
]

if apps.is_installed("drf_spectacular"):
    from drf_spectacular.views import SpectacularAPIView

    # The OpenAPI schema; protected operations document Idempotency-Key by themselves.
    urlpatterns.append(path("api/schema/", SpectacularAPIView.as_view(), name="schema"))
