"""Views for the concurrency, query-budget and cache-store tests: each run records an effect.

The ``effect_*`` views write an effect row; the ``count_*`` views only count their runs.

Each view is told by ``?note=<tag>`` which test it serves, so tests running in any order (and
the rows they leave) never mix. ``?sleep=<seconds>`` makes the view slow. What the view does
beyond that is steered from outside the request, so that a retry sends the *same* request
(same fingerprint) as the run it retries:

* :func:`fail_next_run` makes the next run for a note raise after writing its effect;
* :func:`hold_runs` makes runs for a note wait, once started, until the test lets them go;
* in a worker process (``tests/race_worker.py``), ``RACE_WORKER_HOLD`` (``before`` or
  ``after`` the effect row) makes the view write ``RACE_WORKER_MARKER`` with its database
  connection's id and then block until the test kills the process.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import JsonResponse

from django_idempotency.decorators import idempotent
from tests.models import Charge
from tests.views import HAS_DRF

_lock = threading.Lock()
_runs: Counter[str] = Counter()
_entered: dict[str, threading.Event] = {}
_windows: dict[str, list[tuple[float, float]]] = {}
_failures: set[str] = set()
_gates: dict[str, threading.Event] = {}
HOLD_TIMEOUT = 10  # seconds: a held run that is never let go fails instead of hanging


def runs(note: str) -> int:
    """How many times a view started running for ``note`` in this process."""
    with _lock:
        return _runs[note]


def entered(note: str) -> threading.Event:
    """Set once a view has started running for ``note``."""
    with _lock:
        return _entered.setdefault(note, threading.Event())


def windows(note: str) -> list[tuple[float, float]]:
    """``(start, end)`` on ``time.monotonic()`` of each finished run for ``note``."""
    with _lock:
        return list(_windows.get(note, []))


def fail_next_run(note: str) -> None:
    """Make the next run for ``note`` raise once it has written its effect row."""
    with _lock:
        _failures.add(note)


def hold_runs(note: str) -> threading.Event:
    """Make runs for ``note`` wait, once started, until the returned event is set."""
    with _lock:
        return _gates.setdefault(note, threading.Event())


def _start(note: str) -> float:
    with _lock:
        _runs[note] += 1
        event = _entered.setdefault(note, threading.Event())
    event.set()
    return time.monotonic()


def _finish(note: str, started: float) -> None:
    with _lock:
        _windows.setdefault(note, []).append((started, time.monotonic()))
        failing = note in _failures
        _failures.discard(note)
    if failing:
        raise RuntimeError(f"the view failed on purpose ({note})")


def _hold(where: str) -> None:
    """In a worker process: tell the test we are inside the view, then block until killed."""
    if os.environ.get("RACE_WORKER_HOLD") != where:
        return
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_backend_pid()")
        else:
            cursor.execute("SELECT CONNECTION_ID()")
        (backend,) = cursor.fetchone()
    marker = Path(os.environ["RACE_WORKER_MARKER"])
    partial = marker.with_suffix(".partial")
    partial.write_text(
        json.dumps({"backend": backend, "in_atomic_block": connection.in_atomic_block})
    )
    partial.rename(marker)  # the test never reads a half-written marker
    time.sleep(float(os.environ.get("RACE_WORKER_HOLD_SECONDS", "30")))


def _amount(request: Any) -> int:
    if hasattr(request, "data"):  # a DRF Request
        return int(request.data.get("amount", 0))
    return int(json.loads(request.body or b"{}").get("amount", 0))


def _effect(request: Any, note: str) -> dict[str, Any]:
    _hold("before")
    charge = Charge.objects.create(amount=_amount(request), note=note)
    _hold("after")
    return {
        "charge": charge.pk,
        "amount": charge.amount,
        "note": note,
        "user": request.user.get_username(),
    }


def _run(request: Any) -> dict[str, Any]:
    note = request.GET.get("note", "")
    started = _start(note)
    time.sleep(float(request.GET.get("sleep", "0")))
    data = _effect(request, note)
    _finish(note, started)
    return data


def _json(data: dict[str, Any]) -> JsonResponse:
    response = JsonResponse(data, status=201)
    response["Location"] = f"/charges/{data['charge']}"
    return response


def effect_plain(request):
    """The undecorated twin of the decorated views (for the query budgets)."""
    return _json(_run(request))


@idempotent
def effect_atomic(request):
    return _json(_run(request))


@idempotent(atomic=False)
def effect_lease(request):
    return _json(_run(request))


@idempotent(wait=timedelta(seconds=5))
def effect_wait(request):
    return _json(_run(request))


async def _run_async(request: Any) -> dict[str, Any]:
    note = request.GET.get("note", "")
    started = _start(note)
    await asyncio.sleep(float(request.GET.get("sleep", "0")))
    data = await sync_to_async(_effect)(request, note)
    _finish(note, started)
    return data


async def effect_async_plain(request):
    """The undecorated twin of :func:`effect_async`."""
    return _json(await _run_async(request))


@idempotent
async def effect_async(request):
    return _json(await _run_async(request))


# Views without a database write, for the cache store's tests (tests/test_cache_store.py,
# tests/test_redis_outage.py): they run the same on every database, SQLite's in-memory test
# database included, and a test needs no database access at all. Each run answers with an id
# of its own, so a replay is told from a second run by its body.


def _count(request: Any) -> JsonResponse:
    note = request.GET.get("note", "")
    started = _start(note)
    time.sleep(float(request.GET.get("sleep", "0")))
    with _lock:
        gate = _gates.get(note)
    if gate is not None and not gate.wait(HOLD_TIMEOUT):
        raise RuntimeError(f"a held run was never let go ({note})")
    _finish(note, started)
    response = JsonResponse({"note": note, "run": uuid.uuid4().hex}, status=201)
    response["Location"] = f"/runs/{note}"
    return response


@idempotent(atomic=False)
def count_lease(request):
    return _count(request)


@idempotent(atomic=False, wait=timedelta(seconds=5))
def count_wait(request):
    return _count(request)


if HAS_DRF:  # the tox "minimal" env runs without DRF
    from rest_framework.response import Response
    from rest_framework.views import APIView

    from django_idempotency.rest_framework import IdempotentMixin

    class PlainEffectAPIView(APIView):
        """The undecorated twin of :class:`EffectAPIView`."""

        def post(self, request):
            data = _run(request)
            return Response(data, status=201, headers={"Location": f"/charges/{data['charge']}"})

    class EffectAPIView(IdempotentMixin, PlainEffectAPIView):
        pass
