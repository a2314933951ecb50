"""The shop's outbox publisher: events written by its views, published by the outbox relay.

``pay_order`` writes a ``shop.order_paid`` event in the transaction of the payment
(``django_idempotency.outbox.add_event``); ``python manage.py idempotency_outbox_relay`` hands
it here. A real shop would send it to a broker (``django_idempotency.celery.publish_task``
sends it to Celery); the demo logs it.
"""

from __future__ import annotations

import logging

from django_idempotency.models import OutboxEvent

logger = logging.getLogger("shop.events")


def log_event(event: OutboxEvent) -> None:
    logger.warning("published %s %s: %s", event.topic, event.message_id, event.payload)
