from django.urls import include, path
from rest_framework.routers import DefaultRouter

from tests import views

router = DefaultRouter()
router.register("viewset/charges", views.ChargeViewSet)

urlpatterns = [
    path("plain/", views.plain_charge),
    path("sync/", views.sync_charge),
    path("sync/required/", views.sync_charge_required),
    path("sync/lease/", views.sync_charge_lease),
    path("sync/wait/", views.sync_charge_wait),
    path("async/", views.async_charge),
    path("async/required/", views.async_charge_required),
    path("api/", views.api_charge),
    path("apiview/", views.ChargeAPIView.as_view()),
    path("race/", include("tests.race_urls")),
    path("", include(router.urls)),
]
