"""A stand-in for a parcel carrier's API: labels bought and voided, deduplicated by key.

Like a real carrier's (or a payment provider's) API, it takes an idempotency key: the same
key buys the same label once, so a retried call after a lost answer does not buy a second
one. Its labels live in ``CarrierLabel``, which stands for the carrier's own database.
"""

from __future__ import annotations

import hashlib
import logging

from .models import CarrierLabel

logger = logging.getLogger("shop.carrier")


def buy_label(order_id: int, service: str, *, idempotency_key: str) -> str:
    """Buy a label for ``order_id``; the same ``idempotency_key`` returns the same label."""
    label = "lbl_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:20]
    CarrierLabel.objects.get_or_create(label=label, defaults={"order_id": order_id})
    logger.info("carrier: label %s (%s) for order %s", label, service, order_id)
    return label


def void_label(label: str, *, idempotency_key: str) -> None:
    """Void ``label``: it is no longer charged for. Voiding it again changes nothing."""
    CarrierLabel.objects.filter(label=label).update(voided=True)
    logger.info("carrier: label %s voided (key %s)", label, idempotency_key)
