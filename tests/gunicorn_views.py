"""Views and URLs of the test app served by gunicorn (tests/test_cache_store_processes.py).

Each run increments a counter in Redis (``INCR`` is atomic across processes) and answers with
an id of its own. Every answer, the idempotency layer's own included, says which worker
process gave it (``X-Served-By``, added by a middleware, so never stored nor replayed).
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

from django.core.cache import caches
from django.http import HttpResponse, JsonResponse
from django.urls import path

from django_idempotency.decorators import idempotent


def runs_key(note: str) -> str:
    """The Redis key counting the runs for ``note``, under the app's cache key prefix."""
    return caches["store"].make_key(f"runs:{note}")


def _count(request):
    note = request.GET.get("note", "")
    client = caches["store"].client.get_client(write=True)
    client.incr(runs_key(note))
    time.sleep(float(request.GET.get("sleep", "0")))
    response = JsonResponse({"note": note, "run": uuid.uuid4().hex}, status=201)
    response["Location"] = f"/runs/{note}"
    return response


@idempotent(atomic=False)
def count_lease(request):
    return _count(request)


@idempotent(atomic=False, wait=timedelta(seconds=5))
def count_wait(request):
    return _count(request)


def served_by(get_response):
    def middleware(request):
        response = get_response(request)
        response["X-Served-By"] = str(os.getpid())
        return response

    return middleware


def ready(request):
    return HttpResponse("ready", content_type="text/plain")


urlpatterns = [
    path("ready/", ready),
    path("count/lease/", count_lease),
    path("count/wait/", count_wait),
]
