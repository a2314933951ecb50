"""URLs of the views under test.

Each kind of function view (``sync``: atomic mode, ``lease``: ``atomic=False``, ``async``,
``api``: under DRF's ``@api_view``) is served at its base URL and at variants below it:
``again/`` (same view, another path), ``required/``, ``optional/`` (``required=False``),
``put-only/`` (``methods=["put"]``), ``ttl/`` (``ttl`` of two days) and ``short-wait/``
(``wait`` of 0.3 s).
"""

from __future__ import annotations

from datetime import timedelta

from django.urls import include, path

from tests import views

VARIANTS = {
    "": {},
    "again/": {},
    "required/": {"required": True},
    "optional/": {"required": False},
    "put-only/": {"methods": ["put"]},
    "ttl/": {"ttl": timedelta(days=2)},
    "short-wait/": {"wait": timedelta(seconds=0.3)},
}


def _patterns(base: str, make_view, **options):
    return [
        path(f"{base}{suffix}", make_view(**options, **variant))
        for suffix, variant in VARIANTS.items()
    ]


urlpatterns = [
    path("plain/", views.plain_charge),
    path("plain/again/", views.plain_charge),
    path("plain/async/", views.plain_async_charge),
    path("sync/wait/", views.sync_charge_wait),
    path("sync/items/<str:item>/", views.sync_charge_item),
    path("race/", include("tests.race_urls")),
    *_patterns("sync/lease/", views.sync_view, atomic=False),
    *_patterns("sync/", views.sync_view),
    *_patterns("async/", views.async_view),
]

if views.HAS_DRF:
    from rest_framework.routers import DefaultRouter

    router = DefaultRouter()
    router.register("viewset/charges", views.ChargeViewSet)

    urlpatterns += [
        *_patterns("api/", views.api_view_for),
        path("apiview/", views.ChargeAPIView.as_view()),
        path("apiview/optional/", views.OptionalChargeAPIView.as_view()),
        path("apiview/lease/", views.LeaseChargeAPIView.as_view()),
        path("", include(router.urls)),
    ]
