"""django-idempotency's benchmark endpoints: the baseline, the atomic mode and the lease mode."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from django_idempotency.decorators import idempotent

from .work import create_order, create_order_realistic


def ping(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


@api_view(["POST"])
def baseline(request: Request) -> Response:
    """The same work with no idempotency at all: what everything else is compared with."""
    return create_order(request)


@api_view(["POST"])
@idempotent
def atomic(request: Request) -> Response:
    """The default: the view runs inside the transaction that claims and locks the key."""
    return create_order(request)


@api_view(["POST"])
@idempotent(atomic=False)
def lease(request: Request) -> Response:
    """The lease mode: claim, view and completion in separate short transactions."""
    return create_order(request)


@api_view(["POST"])
def realistic_baseline(request: Request) -> Response:
    """Three queries and a DRF serializer, with no idempotency."""
    return create_order_realistic(request)


@api_view(["POST"])
@idempotent
def realistic_atomic(request: Request) -> Response:
    """Three queries and a DRF serializer, in the atomic mode."""
    return create_order_realistic(request)
