"""URLs of the demo project: the admin, the shop's API and a redirect from ``/`` to it."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(url="/api/", permanent=False)),
    path("admin/", admin.site.urls),
    path("api/", include("shop.urls")),
    path("api-auth/", include("rest_framework.urls")),
]
