"""DRF views whose options come from their own ``get_idempotency_options()``, and their URLs.

Each override says something other than the class attributes it replaces: the schema
(``tests/test_openapi.py``) and ``IdempotencyMiddleware`` (``tests/test_middleware.py``) must
follow the override, as the view itself does (docs/drf.md). A test serves these views by
setting ``ROOT_URLCONF`` to this module. Imported only where DRF is installed.
"""

from __future__ import annotations

from typing import Any

from django.urls import include, path
from rest_framework import viewsets
from rest_framework.decorators import api_view
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.views import APIView

from django_idempotency.core import Options
from django_idempotency.decorators import idempotent
from django_idempotency.rest_framework import IdempotentMixin
from tests.models import Charge
from tests.views import RUNS, ChargeSerializer


class RequiredByOverrideViewSet(IdempotentMixin, viewsets.ModelViewSet):
    """Charges whose key the override requires, although the attribute leaves it optional."""

    queryset = Charge.objects.all()
    serializer_class = ChargeSerializer
    idempotency_required = False

    def get_idempotency_options(self) -> Options:
        return Options(required=True)


class PostOnlyByOverrideViewSet(IdempotentMixin, viewsets.ModelViewSet):
    """Charges whose override covers POST only, although the attribute lists PATCH and PUT."""

    queryset = Charge.objects.all()
    serializer_class = ChargeSerializer
    idempotency_methods = ("POST", "PATCH", "PUT")

    def get_idempotency_options(self) -> Options:
        return Options(methods=["POST"])


class UndocumentedViewSet(IdempotentMixin, viewsets.ModelViewSet):
    queryset = Charge.objects.all()
    serializer_class = ChargeSerializer


class DocumentedBase(viewsets.ModelViewSet):
    """Charges, described by a base listed after the mixin."""

    queryset = Charge.objects.all()
    serializer_class = ChargeSerializer


class DocumentedByItsBaseViewSet(IdempotentMixin, DocumentedBase):
    pass


class RequiredByOverrideAPIView(IdempotentMixin, APIView):
    """Records its runs; its override requires the key, its attribute leaves it optional."""

    idempotency_required = False

    def get_idempotency_options(self) -> Options:
        return Options(required=True)

    def post(self, request: Any) -> Response:
        RUNS.append(request.path)
        return Response({"runs": len(RUNS)}, status=201)


@api_view(["POST"])
@idempotent
def recorded_api_view(request: Any) -> Response:
    RUNS.append(request.path)
    return Response({"runs": len(RUNS)}, status=201)


def without_wraps(view: Any) -> Any:
    """A decorator written without ``functools.wraps``: it copies none of the view's attributes."""

    def wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
        return view(request, *args, **kwargs)

    return wrapper


router = SimpleRouter()
router.register("override/required", RequiredByOverrideViewSet, basename="required-by-override")
router.register("override/post-only", PostOnlyByOverrideViewSet, basename="post-only-by-override")
router.register("undocumented", UndocumentedViewSet, basename="undocumented")
router.register("documented-by-base", DocumentedByItsBaseViewSet, basename="documented-by-base")

urlpatterns = [
    path("override/apiview/", RequiredByOverrideAPIView.as_view()),
    path("wrapped/apiview/", without_wraps(RequiredByOverrideAPIView.as_view())),
    path("wrapped/api/", without_wraps(recorded_api_view)),
    path("", include(router.urls)),
]
