"""Views under test: sync and async function views and DRF views, each counting its runs."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

from asgiref.sync import sync_to_async
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import api_view
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from django_idempotency.decorators import idempotent
from django_idempotency.rest_framework import IdempotentMixin
from tests.models import Charge


def _amount(request) -> int:
    if request.content_type == "application/json":
        return int(json.loads(request.body or b"{}").get("amount", 0))
    return int(request.POST.get("amount", 0))


def _charge(request) -> HttpResponse:
    """Create a charge, or fail in the way the request asks for."""
    behaviour = request.GET.get("behaviour", "")
    if behaviour.startswith("sleep"):
        time.sleep(float(behaviour.removeprefix("sleep")))
    charge = Charge.objects.create(amount=_amount(request), note=request.GET.get("note", ""))
    if behaviour == "raise":
        raise RuntimeError("the view failed")
    if behaviour == "500":
        return JsonResponse({"error": "upstream failed"}, status=500)
    if behaviour == "400":
        return JsonResponse({"error": "bad amount"}, status=400)
    if behaviour == "stream":
        return StreamingHttpResponse(iter([b"a", b"b"]), status=201)
    if behaviour == "large":
        return HttpResponse(b"x" * 5000, status=201, content_type="text/plain")
    response = JsonResponse({"id": charge.pk, "amount": charge.amount}, status=201)
    response["Location"] = f"/charges/{charge.pk}"
    response["ETag"] = f'"charge-{charge.pk}"'
    response["X-Custom"] = "kept"
    response.set_cookie("session_hint", "first-caller")
    return response


def plain_charge(request):
    return _charge(request)


@idempotent
def sync_charge(request):
    return _charge(request)


@idempotent(required=True)
def sync_charge_required(request):
    return _charge(request)


@idempotent(atomic=False)
def sync_charge_lease(request):
    return _charge(request)


@idempotent(wait=timedelta(seconds=5))
def sync_charge_wait(request):
    return _charge(request)


@idempotent
async def async_charge(request):
    behaviour = request.GET.get("behaviour", "")
    if behaviour.startswith("sleep"):
        await asyncio.sleep(float(behaviour.removeprefix("sleep")))
        request.GET = request.GET.copy()
        request.GET["behaviour"] = ""
    return await sync_to_async(_charge)(request)


@idempotent(required=True)
async def async_charge_required(request):
    return await sync_to_async(_charge)(request)


@api_view(["POST"])
@idempotent
def api_charge(request):
    charge = Charge.objects.create(amount=int(request.data.get("amount", 0)))
    return Response({"id": charge.pk, "amount": charge.amount}, status=status.HTTP_201_CREATED)


class ChargeSerializer(serializers.ModelSerializer):
    class Meta:
        model = Charge
        fields = ["id", "amount", "note"]

    def validate_amount(self, value: int) -> int:
        if value <= 0:
            raise ValidationError("The amount must be positive.")
        return value


class ChargeViewSet(IdempotentMixin, viewsets.ModelViewSet):
    queryset = Charge.objects.all()
    serializer_class = ChargeSerializer


class ChargeAPIView(IdempotentMixin, APIView):
    idempotency_required = True

    def post(self, request):
        serializer = ChargeSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        charge = serializer.save()
        return Response(serializer.data, status=201, headers={"Location": f"/charges/{charge.pk}"})
