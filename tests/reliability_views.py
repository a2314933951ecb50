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

import os
import time
import uuid
from pathlib import Path

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
]
