"""The compensations of ``ship_order``'s phases (docs/phases.md, "Compensations").

Registered by name, so that ``python manage.py idempotency_abandoned --compensate``, which
runs in another process than the request that stopped, finds them: django-idempotency
imports each installed app's ``compensations`` module when a name is not yet known.
"""

from __future__ import annotations

from django_idempotency.phases import compensation

from . import carrier
from .models import Shipment


@compensation("shop.void-label")
def void_label(label: str, *, key: str) -> None:
    # The derived key makes the carrier's void call safe to repeat after a crash.
    carrier.void_label(label, idempotency_key=key)


@compensation("shop.cancel-shipment")
def cancel_shipment(shipment_id: int, *, key: str) -> None:
    Shipment.objects.filter(pk=shipment_id).update(status=Shipment.Status.CANCELLED)
