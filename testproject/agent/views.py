"""The agent's tools over HTTP: ``POST /agent/tools/<name>/`` with ``{"arguments": {...}}``.

An agent runtime turns each tool call of the model into one such request and hands the
``{"result": ...}`` it gets back to the model (``agent/client.py`` is such a runtime's client).
``issue_refund`` changes the world, so it is protected by ``@idempotent(required=True)``: the
runtime sends the tool call's id as the ``Idempotency-Key``, and a retried call refunds once.
``list_refunds`` only reads, and needs no key. ``GET /agent/tools/`` lists the tools with the
JSON Schema of their arguments, as a runtime would register them with a model.

Errors are ``application/problem+json`` (RFC 9457), like those of django-idempotency itself,
so the client reads one format. The tools need no login, to keep the demo short; a real
agent would authenticate, and its keys would then be scoped to its own user.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from django_idempotency.core import parse_key
from django_idempotency.decorators import idempotent

from .models import Refund

#: The demo's stand-in for a slow refund provider: a request may ask the tool to take this
#: many seconds (header ``X-Demo-Delay``), so that a client's timeout expires before the
#: first attempt has finished. Capped, so a request cannot hold a worker for long.
DELAY_HEADER = "X-Demo-Delay"
MAX_DELAY = 5.0

TOOLS: list[dict[str, Any]] = [
    {
        "name": "issue_refund",
        "description": (
            "Refund part or all of a customer's order. Each call refunds money: call it once "
            "per refund the customer asked for."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": {"type": "string", "maxLength": 64},
                "amount": {"type": "string", "pattern": r"^\d{1,10}(\.\d{1,2})?$"},
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "default": "EUR"},
                "reason": {"type": "string", "maxLength": 200},
            },
            "required": ["order_id", "amount"],
            "additionalProperties": False,
        },
    },
    {
        "name": "list_refunds",
        "description": "List the refunds issued for an order, oldest first.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string", "maxLength": 64}},
            "required": ["order_id"],
            "additionalProperties": False,
        },
    },
]


class InvalidArguments(Exception):
    """The tool call's arguments do not match the tool's parameters."""

    def response(self) -> HttpResponse:
        problem = {
            "type": "tag:django-idempotency-demo,2026:invalid_arguments",
            "title": "Invalid tool arguments",
            "status": 400,
            "detail": str(self),
        }
        return HttpResponse(
            json.dumps(problem), status=400, content_type="application/problem+json"
        )


def _arguments(request: HttpRequest, allowed: set[str]) -> dict[str, Any]:
    try:
        body = json.loads(request.body)
    except ValueError as exc:
        raise InvalidArguments("The body is not JSON.") from exc
    arguments = body.get("arguments") if isinstance(body, dict) else None
    if not isinstance(arguments, dict):
        raise InvalidArguments('Expected a JSON object with an "arguments" object.')
    if unknown := sorted(set(arguments) - allowed):
        raise InvalidArguments(f"Unknown arguments: {', '.join(unknown)}.")
    return arguments


def _string(arguments: dict[str, Any], name: str, *, max_length: int, default: str = "") -> str:
    value = arguments.get(name, default)
    if not isinstance(value, str) or len(value) > max_length:
        raise InvalidArguments(f"{name} must be a string of at most {max_length} characters.")
    return value


def _required_string(arguments: dict[str, Any], name: str, *, max_length: int) -> str:
    if not (value := _string(arguments, name, max_length=max_length)):
        raise InvalidArguments(f"{name} is required.")
    return value


def _amount(arguments: dict[str, Any]) -> Decimal:
    try:
        amount = Decimal(str(arguments.get("amount")))
    except InvalidOperation as exc:
        raise InvalidArguments('amount must be a decimal string such as "25.00".') from exc
    if not amount.is_finite() or not 0 < amount < 10**10:
        raise InvalidArguments("amount must be positive and less than 10,000,000,000.")
    cents = amount.quantize(Decimal("0.01"))
    if cents != amount:
        raise InvalidArguments("amount must have at most two decimal places.")
    return cents


def _demo_delay(request: HttpRequest) -> float:
    try:
        delay = float(request.headers.get(DELAY_HEADER, "0"))
    except ValueError:
        return 0.0
    return min(max(delay, 0.0), MAX_DELAY) if math.isfinite(delay) else 0.0


def _refund_json(refund: Refund) -> dict[str, Any]:
    return {
        "refund_id": refund.reference,
        "order_id": refund.order_id,
        "amount": str(refund.amount),
        "currency": refund.currency,
        "reason": refund.reason,
        "status": "issued",
        "created": refund.created.isoformat(),
    }


@require_GET
def tool_list(request: HttpRequest) -> JsonResponse:
    """The tools, with the JSON Schema of their arguments."""
    return JsonResponse({"tools": TOOLS})


@csrf_exempt
@require_POST
@idempotent(required=True, wait=timedelta(seconds=1))
def issue_refund(request: HttpRequest) -> HttpResponse:
    """Refund an order, once per tool call (the ``Idempotency-Key``, which is required).

    The view runs in the atomic mode: the ``Refund`` row and the stored answer commit
    together. A retry that arrives while the refund is still running waits up to a second
    for it (``wait``) and gets its answer; after that it is answered ``409`` with
    ``Retry-After`` and tries again later. Invalid arguments are answered ``400``, and that
    answer is stored too: the same tool call with the same arguments gets it again.
    """
    try:
        arguments = _arguments(request, {"order_id", "amount", "currency", "reason"})
        order_id = _required_string(arguments, "order_id", max_length=64)
        amount = _amount(arguments)
        currency = _string(arguments, "currency", max_length=3, default="EUR")
        if len(currency) != 3 or not currency.isascii() or not currency.isupper():
            raise InvalidArguments("currency must be three capital letters, such as EUR.")
        reason = _string(arguments, "reason", max_length=200)
    except InvalidArguments as exc:
        return exc.response()
    # The slow part of a refund: the provider's API, here a sleep the request asks for.
    time.sleep(_demo_delay(request))
    refund = Refund.objects.create(
        reference=f"re_{uuid.uuid4().hex[:24]}",
        order_id=order_id,
        amount=amount,
        currency=currency,
        reason=reason,
        tool_call_id=parse_key(request.headers[settings.IDEMPOTENCY_HEADER]),
    )
    return JsonResponse({"result": _refund_json(refund)}, status=201)


@csrf_exempt
@require_POST
def list_refunds(request: HttpRequest) -> HttpResponse:
    """The refunds of an order. Reading changes nothing, so no key is needed."""
    try:
        arguments = _arguments(request, {"order_id"})
        order_id = _required_string(arguments, "order_id", max_length=64)
    except InvalidArguments as exc:
        return exc.response()
    refunds = [_refund_json(refund) for refund in Refund.objects.filter(order_id=order_id)]
    return JsonResponse({"result": {"order_id": order_id, "refunds": refunds}})
