"""The benchmark endpoint wired with each of the other packages, as their READMEs show.

Only the view of ``settings.PEER`` is defined, since only that package is installed in the
server's virtualenv. The work is the same as django-idempotency's (``bench.work``).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .work import create_order


def ping(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


view: Any

if settings.PEER == "django-idempotency-key":
    from idempotency_key.decorators import idempotency_key

    @idempotency_key  # above @api_view, as its README requires
    @api_view(["POST"])
    def view(request: Request) -> Response:
        return create_order(request)

elif settings.PEER == "djangorestframework-idempotency-key":
    from rest_framework_idempotency_key.decorators import simple_idempotency_key_method

    class _View(APIView):
        @simple_idempotency_key_method
        def post(self, request: Request) -> Response:
            return create_order(request)

    view = _View.as_view()

elif settings.PEER in ("drf-idem", "drf-idempotency"):  # their middleware does it all

    @api_view(["POST"])
    def view(request: Request) -> Response:
        return create_order(request)

elif settings.PEER == "drf-idempotencykey":
    from drf_idempotencykey.mixins import DrfIdempotencyKeyMixin

    class _MixinView(DrfIdempotencyKeyMixin, APIView):
        def post(self, request: Request) -> Response:
            return create_order(request)

    view = _MixinView.as_view()
