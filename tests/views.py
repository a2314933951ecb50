"""Views under test: sync and async function views and DRF views, each recording its runs.

Every view "charges" a customer (one ``Charge`` row per run) and appends to :data:`RUNS`, so a
test can tell whether the view ran even when its database writes were rolled back. The query
parameter ``behaviour`` makes a view misbehave after it has written its row: ``raise``,
``400``, ``500``, ``stream``, ``large`` (a 5,000-byte body), ``sleep<seconds>``, ``template``
(a lazily rendered ``TemplateResponse``) or ``peek`` (answer with the request's key as the
view sees it while it runs).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.template import engines
from django.template.response import TemplateResponse

from django_idempotency.core import parse_key, user_scope
from django_idempotency.decorators import idempotent
from django_idempotency.stores import DatabaseStore
from tests.models import Charge
from tests.store_harness import current_harness

#: One entry per run of a view under test, in order; emptied before each test (conftest.py).
RUNS: list[str] = []

#: A ``Date`` header set by the views themselves: it must never be replayed.
VIEW_DATE = "Thu, 01 Jan 2026 00:00:00 GMT"

LARGE_BODY_SIZE = 5000


def _amount(request: Any) -> int | None:
    """The amount the request asks for, or ``None`` when its body cannot be read."""
    try:
        if request.content_type == "application/json":
            data = json.loads(request.body or b"{}")
            return int(data.get("amount", 0))
        return int(request.POST.get("amount", 0))
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None


def _decorate(response: HttpResponse, charge: Charge) -> HttpResponse:
    """Headers a replay must keep (``Location``, ``ETag``, a custom one) and drop (cookie,
    ``Date``, a hop-by-hop header)."""
    response["Location"] = f"/charges/{charge.pk}"
    response["ETag"] = f'"charge-{charge.pk}"'
    response["X-Custom"] = "kept"
    response["Date"] = VIEW_DATE
    response["Keep-Alive"] = "timeout=5"
    response.set_cookie("session_hint", "first-caller")
    return response


def _charge(request: Any) -> HttpResponse:
    """Create a charge, or fail in the way the request asks for."""
    RUNS.append(request.path)
    behaviour = request.GET.get("behaviour", "")
    if behaviour.startswith("sleep"):
        time.sleep(float(behaviour.removeprefix("sleep")))
    amount = _amount(request)
    if amount is None:
        return JsonResponse({"error": "unreadable body"}, status=400)
    charge = Charge.objects.create(amount=amount, note=request.GET.get("note", ""))
    if behaviour == "raise":
        raise RuntimeError("the view failed")
    if behaviour == "500":
        return JsonResponse({"error": "upstream failed"}, status=500)
    if behaviour == "400":
        return JsonResponse({"error": "bad amount"}, status=400)
    if behaviour == "stream":
        return StreamingHttpResponse(iter([b"a", b"b"]), status=201)
    if behaviour == "large":
        return HttpResponse(b"x" * LARGE_BODY_SIZE, status=201, content_type="text/plain")
    if behaviour == "peek":
        return JsonResponse(peek_key(request), status=201)
    if behaviour == "template":
        template = engines["django"].from_string(
            "<p>Charge {{ charge.pk }}: {{ charge.amount }}</p>"
        )
        return _decorate(
            TemplateResponse(request, template, {"charge": charge}, status=201), charge
        )
    response = JsonResponse({"id": charge.pk, "amount": charge.amount}, status=201)
    return _decorate(response, charge)


def peek_key(request: Any) -> dict[str, Any]:
    """The request's own key as its running view sees it, in whichever store holds it: its
    state, the seconds left on its lease (``None`` without one), and how many keys there are."""
    harness = current_harness()
    record = harness.get(parse_key(request.headers["Idempotency-Key"]), scope=user_scope(request))
    if record is None:  # PostgreSQL's advisory claims: no row until the response is stored
        return {"state": None, "lease": None, "keys": harness.count()}
    return {
        "state": record.state,
        "lease": None if record.lease is None else record.lease.total_seconds(),
        "keys": harness.count(),
    }


def plain_charge(request):
    return _charge(request)


async def plain_async_charge(request):
    """An unprotected async view (``IdempotencyMiddleware`` protects it under ASGI)."""
    return await sync_to_async(_charge)(request)


def sync_view(**options: Any):
    """A sync function view under ``@idempotent(**options)``."""

    @idempotent(**options)
    def charge(request):
        return _charge(request)

    return charge


def async_view(**options: Any):
    """An async function view under ``@idempotent(**options)``."""

    @idempotent(**options)
    async def charge(request):
        behaviour = request.GET.get("behaviour", "")
        if behaviour.startswith("sleep"):
            await asyncio.sleep(float(behaviour.removeprefix("sleep")))
            request.GET = request.GET.copy()
            request.GET["behaviour"] = ""
        return await sync_to_async(_charge)(request)

    return charge


@idempotent
def sync_charge(request):
    return _charge(request)


@idempotent
def sync_charge_item(request, item):
    """Under a path with a part of the client's choosing (``/sync/items/<item>/``)."""
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


async_charge = async_view()
async_charge_required = async_view(required=True)


# -- Hooks named by settings in the tests --------------------------------------------------


class OfflineStore(DatabaseStore):
    """The database store on the alias ``offline``, which ``conftest.offline_store`` adds
    pointing at a file in a directory that does not exist: every query fails to connect."""

    using = "offline"


def tenant_scope(request) -> str:
    """An ``IDEMPOTENCY_SCOPE``: keys belong to the tenant named by ``X-Tenant``."""
    return f"tenant:{request.headers.get('X-Tenant', '')}"


def method_and_path_fingerprint(request) -> str:
    """An ``IDEMPOTENCY_FINGERPRINT`` that ignores the query string and the body."""
    return hashlib.sha256(f"{request.method} {request.path}".encode()).hexdigest()


def verbose_fingerprint(request) -> str:
    """An ``IDEMPOTENCY_FINGERPRINT`` that returns the request itself, longer than a digest."""
    return f"{request.method} {request.get_full_path()} {request.body.decode()} " + "." * 100


# -- Django REST Framework ---------------------------------------------------------------------

try:
    from rest_framework import serializers, viewsets
    from rest_framework.decorators import api_view
    from rest_framework.exceptions import NotFound, ValidationError
    from rest_framework.response import Response
    from rest_framework.views import APIView
except ImportError:  # the tox "minimal" env runs without DRF
    HAS_DRF = False
else:
    HAS_DRF = True

if HAS_DRF:
    from django_idempotency.rest_framework import IdempotentMixin

    def _drf_outcome(request: Any, response: Response) -> Response:
        """Misbehave after the view has written, as ``behaviour`` asks; else decorate."""
        behaviour = request.query_params.get("behaviour", "")
        if behaviour == "raise":
            raise RuntimeError("the view failed")
        if behaviour == "notfound":
            raise NotFound()
        if behaviour == "500":
            return Response({"error": "upstream failed"}, status=500)
        if behaviour == "400":
            return Response({"error": "bad amount"}, status=400)
        if behaviour == "stream":
            return StreamingHttpResponse(iter([b"a", b"b"]), status=response.status_code)
        if behaviour == "large":
            return Response({"data": "x" * LARGE_BODY_SIZE}, status=response.status_code)
        if behaviour == "peek":
            return Response(peek_key(request), status=response.status_code)
        return response

    def _drf_decorate(response: Response, pk: int) -> Response:
        response["ETag"] = f'"charge-{pk}"'
        response["X-Custom"] = "kept"
        response["Date"] = VIEW_DATE
        response["Keep-Alive"] = "timeout=5"
        response.set_cookie("session_hint", "first-caller")
        return response

    def api_view_for(**options: Any):
        """A function view under DRF's ``@api_view`` and ``@idempotent(**options)``."""

        @api_view(["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"])
        @idempotent(**options)
        def charge(request):
            RUNS.append(request.path)
            try:
                amount = int(request.data.get("amount", 0))
            except (ValueError, TypeError, AttributeError, RecursionError):
                # RecursionError: DRF's JSON parser lets it through for deeply nested JSON.
                return Response({"error": "unreadable body"}, status=400)
            charge = Charge.objects.create(amount=amount, note=request.query_params.get("note", ""))
            response = Response({"id": charge.pk, "amount": charge.amount}, status=201)
            response["Location"] = f"/charges/{charge.pk}"
            return _drf_outcome(request, _drf_decorate(response, charge.pk))

        return charge

    api_charge = api_view_for()

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

        def create(self, request, *args, **kwargs):
            RUNS.append(request.path)
            response = super().create(request, *args, **kwargs)
            return _drf_outcome(request, _drf_decorate(response, response.data["id"]))

        def partial_update(self, request, *args, **kwargs):
            RUNS.append(request.path)
            response = super().partial_update(request, *args, **kwargs)
            return _drf_outcome(request, _drf_decorate(response, response.data["id"]))

    class ChargeAPIView(IdempotentMixin, APIView):
        idempotency_required = True

        def post(self, request):
            RUNS.append(request.path)
            serializer = ChargeSerializer(data=request.data)
            serializer.is_valid(raise_exception=True)
            charge = serializer.save()
            response = Response(
                serializer.data, status=201, headers={"Location": f"/charges/{charge.pk}"}
            )
            return _drf_outcome(request, _drf_decorate(response, charge.pk))

    class OptionalChargeAPIView(ChargeAPIView):
        idempotency_required = None

    class LeaseChargeAPIView(ChargeAPIView):
        idempotency_atomic = False
