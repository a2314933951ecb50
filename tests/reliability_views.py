"""Views and URLs of the app the reliability tests serve with gunicorn.

Each run performs one *effect*: a ``Charge`` row in the database (``/effect/atomic/``,
``/effect/lease/``), or, for the cache store, an ``INCR`` of a Redis counter
(``/count/lease/``), which every worker process and the test can see. ``?note=`` names the
operation and ``?sleep=`` makes the view slow. A test makes the next run for a note stop
``before`` or ``after`` its effect with a hold file in ``RELIABILITY_HOLD_DIR``
(``Server.hold()``), until the test kills its worker or deletes the file; the run tells the
test it is there by writing its pid to a marker.
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from django.core.cache import caches
from django.http import HttpResponse, JsonResponse
from django.urls import path

from django_idempotency.decorators import idempotent
from tests.models import Charge


def runs_key(note: str) -> str:
    """The Redis key counting the effects for ``note``, under the app's cache key prefix."""
    return caches["store"].make_key(f"effects:{note}")


def _hold(note: str, where: str) -> None:
    directory = Path(os.environ["RELIABILITY_HOLD_DIR"])
    hold = directory / f"hold-{note}"
    try:
        if hold.read_text() != where:
            return
    except FileNotFoundError:
        return
    partial = directory / f"inside-{note}.partial"
    partial.write_text(str(os.getpid()))
    partial.rename(directory / f"inside-{note}")  # never read half-written
    # Until the test kills this worker, or lets the view go on by deleting the hold file.
    deadline = time.monotonic() + 60
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _answer(note: str, effect: int | str) -> JsonResponse:
    response = JsonResponse({"note": note, "effect": effect, "run": uuid.uuid4().hex}, status=201)
    response["Location"] = f"/effects/{note}"
    return response


def _charge(request) -> JsonResponse:
    note = request.GET.get("note", "")
    time.sleep(float(request.GET.get("sleep", "0")))
    _hold(note, "before")
    charge = Charge.objects.create(amount=7, note=note)
    _hold(note, "after")
    return _answer(note, charge.pk)


@idempotent
def effect_atomic(request):
    return _charge(request)


@idempotent(atomic=False)
def effect_lease(request):
    return _charge(request)


@idempotent(atomic=False)
def count_lease(request):
    note = request.GET.get("note", "")
    time.sleep(float(request.GET.get("sleep", "0")))
    _hold(note, "before")
    count = caches["store"].client.get_client(write=True).incr(runs_key(note))
    _hold(note, "after")
    return _answer(note, int(count))


# -- A view in phases -------------------------------------------------------------------------


class SimulatedFailure(Exception):
    """Raised by ``/phased/`` with ``X-Fail: <where>``: the view dies there, as a crash would."""


def provider_charge(key: str, amount: int) -> dict[str, str]:
    """Call the "payment provider": one charge per idempotency key, however often it is called.

    Stands in for another service that honours idempotency keys, as Stripe does. Its ledger is
    a file per key in ``RELIABILITY_HOLD_DIR/provider/``, a line per call naming the charge
    made by the first: outside every database transaction, and seen by every worker process.
    """
    directory = Path(os.environ["RELIABILITY_HOLD_DIR"]) / "provider"
    directory.mkdir(exist_ok=True)
    with (directory / key).open("a+") as ledger:
        fcntl.flock(ledger, fcntl.LOCK_EX)
        ledger.seek(0)
        calls = ledger.read().split()
        charge = calls[0] if calls else f"ch_{uuid.uuid4().hex[:16]}"
        ledger.write(f"{charge}\n")
    return {"provider_charge": charge, "amount": amount}


def provider_ledger(hold_dir: Path | None = None) -> dict[str, list[str]]:
    """Each idempotency key the provider was called with, and the charge of each call."""
    directory = (hold_dir or Path(os.environ["RELIABILITY_HOLD_DIR"])) / "provider"
    return {path.name: path.read_text().split() for path in sorted(directory.glob("*"))}


def _phased(request) -> JsonResponse:
    """Checkout in three phases: an order (atomic), a provider's charge, a receipt (atomic).

    ``?note=`` names the operation. An ``X-Fail`` header (``after-order``,
    ``after-provider-call``, ``in-receipt``) makes the view raise there; headers are not part
    of the fingerprint, so a retry without it is the same request. A hold file
    (``Server.hold()``) for ``after-order`` or ``after-provider-call`` holds the view there
    until its worker is killed.
    """
    run = request.idempotency
    note = request.GET.get("note", "")
    fail = request.headers.get("X-Fail", "")

    def stop(where: str) -> None:
        _hold(note, where)
        if fail == where:
            raise SimulatedFailure(where)

    order = run.phase("order", lambda: Charge.objects.create(amount=7, note=f"{note}:order").pk)
    stop("after-order")

    def charge_card() -> dict[str, Any]:
        result = provider_charge(run.foreign_key("payment"), 7)
        stop("after-provider-call")  # the provider has charged; the point is not saved yet
        return result

    payment = run.phase("payment", charge_card, atomic=False)

    def write_receipt() -> int:
        receipt = Charge.objects.create(amount=0, note=f"{note}:receipt")
        stop("in-receipt")
        return receipt.pk

    receipt = run.phase("receipt", write_receipt)
    body = {
        "order": order,
        "payment": payment,
        "receipt": receipt,
        "payment_key": run.foreign_key("payment"),
        "resumed_after": run.resumed_after,
        "run": uuid.uuid4().hex,
    }
    response = JsonResponse(body, status=201)
    response["Location"] = f"/orders/{order}"
    return response


@idempotent(atomic=False)
def phased_lease(request):
    return _phased(request)


@idempotent
def phased_atomic(request):
    return _phased(request)


@idempotent(atomic=False, required=False)
def phased_optional(request):
    return _phased(request)


@idempotent
async def phased_async(request):
    """The same checkout as an async view (always the lease mode), awaiting ``aphase``."""
    run = request.idempotency
    note = request.GET.get("note", "")
    order = await run.aphase(
        "order", lambda: Charge.objects.create(amount=7, note=f"{note}:order").pk
    )
    if request.headers.get("X-Fail") == "after-order":
        raise SimulatedFailure("after-order")
    payment = await run.aphase(
        "payment", lambda: provider_charge(run.foreign_key("payment"), 7), atomic=False
    )
    receipt = await run.aphase(
        "receipt", lambda: Charge.objects.create(amount=0, note=f"{note}:receipt").pk
    )
    body = {"order": order, "payment": payment, "receipt": receipt}
    return JsonResponse({**body, "resumed_after": run.resumed_after}, status=201)


def _compensated(request) -> JsonResponse:
    """Checkout whose phases declare compensations (``tests/compensations.py``).

    An order (atomic, undone by ``tests-cancel-order``), a provider's charge (undone by
    ``tests-refund-charge``), a receipt (none). ``X-Fail: after-order`` or ``after-payment``
    raises there (a hold file holds the view there instead); ``?decline=1`` compensates after
    the payment and answers 402; ``X-Fail: compensate-then-raise`` compensates, then raises.
    """
    run = request.idempotency
    note = request.GET.get("note", "")
    fail = request.headers.get("X-Fail", "")

    def stop(where: str) -> None:
        _hold(note, where)
        if fail == where:
            raise SimulatedFailure(where)

    order = run.phase(
        "order",
        lambda: Charge.objects.create(amount=7, note=f"{note}:order").pk,
        compensate="tests-cancel-order",
    )
    stop("after-order")
    payment = run.phase(
        "payment",
        lambda: provider_charge(run.foreign_key("payment"), 7),
        atomic=False,
        compensate="tests-refund-charge",
    )
    stop("after-payment")
    if request.GET.get("decline") or fail == "compensate-then-raise":
        undone = run.compensate()
        if fail:
            raise SimulatedFailure(fail)
        return JsonResponse({"declined": True, "compensated": undone}, status=402)
    receipt = run.phase(
        "receipt", lambda: Charge.objects.create(amount=0, note=f"{note}:receipt").pk
    )
    body = {"order": order, "payment": payment, "receipt": receipt}
    return JsonResponse({**body, "resumed_after": run.resumed_after}, status=201)


@idempotent(atomic=False)
def compensated_lease(request):
    return _compensated(request)


@idempotent
async def compensated_async(request):
    """The same, async: ``aphase`` and ``acompensate``."""
    run = request.idempotency
    note = request.GET.get("note", "")
    await run.aphase(
        "order",
        lambda: Charge.objects.create(amount=7, note=f"{note}:order").pk,
        compensate="tests-cancel-order",
    )
    await run.aphase(
        "payment",
        lambda: provider_charge(run.foreign_key("payment"), 7),
        atomic=False,
        compensate="tests-refund-charge",
    )
    undone = await run.acompensate()
    return JsonResponse({"declined": True, "compensated": undone}, status=402)


def served_by(get_response):
    """Every answer names the worker process that gave it (never stored, never replayed)."""

    def middleware(request):
        response = get_response(request)
        response["X-Served-By"] = str(os.getpid())
        return response

    return middleware


def ready(request):
    return HttpResponse("ready", content_type="text/plain")


urlpatterns = [
    path("ready/", ready),
    path("effect/atomic/", effect_atomic),
    path("effect/lease/", effect_lease),
    path("count/lease/", count_lease),
    path("phased/", phased_lease),
    path("phased/atomic/", phased_atomic),
    path("phased/optional/", phased_optional),
    path("phased/async/", phased_async),
    path("compensated/", compensated_lease),
    path("compensated/async/", compensated_async),
]

if find_spec("rest_framework"):
    from rest_framework.views import APIView

    from django_idempotency.rest_framework import IdempotentMixin

    class PhasedAPIView(IdempotentMixin, APIView):
        """The checkout as a DRF view: the run is on DRF's request too."""

        authentication_classes: list[type] = []
        permission_classes: list[type] = []
        idempotency_atomic = False

        def post(self, request):
            return _phased(request)

    urlpatterns.append(path("phased/drf/", PhasedAPIView.as_view()))
