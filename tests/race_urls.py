"""Views for the concurrency tests (tests/test_concurrency.py) and the query budgets."""

from django.urls import path

from tests import race_views

urlpatterns = [
    path("plain/", race_views.effect_plain),
    path("atomic/", race_views.effect_atomic),
    path("lease/", race_views.effect_lease),
    path("wait/", race_views.effect_wait),
    path("async/plain/", race_views.effect_async_plain),
    path("async/", race_views.effect_async),
    path("count/lease/", race_views.count_lease),
    path("count/wait/", race_views.count_wait),
]
if race_views.HAS_DRF:
    urlpatterns += [
        path("drf/plain/", race_views.PlainEffectAPIView.as_view()),
        path("drf/", race_views.EffectAPIView.as_view()),
    ]
