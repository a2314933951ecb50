"""Signals sent as requests pass through the protocol, for metrics, tracing and audit.

Every signal is sent with ``sender`` set to the class of the store in use and these keyword
arguments: ``request`` (the Django ``HttpRequest``), ``scope`` and ``key``. Some add more, as
listed below. Receivers run synchronously in the request's thread, so keep them cheap (count,
don't query); an exception raised by a receiver is logged and otherwise ignored: a metric
never changes an answer. No signal carries a request or response body.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger("django_idempotency")

#: The request claimed its key and its view is about to run. ``mode``: ``"atomic"`` or
#: ``"lease"``.
key_claimed = Signal()

#: A record left by another request was replaced by this request's claim. ``reason``:
#: ``"expired"`` (the key's TTL had passed) or ``"abandoned"`` (its request died: its lease
#: passed, or in the atomic mode its row lock was free).
key_taken_over = Signal()

#: The view's response was stored for replay. ``status``: its status code; ``replayable``:
#: ``False`` when it was stored without a body (streamed or too large).
response_stored = Signal()

#: A stored response was replayed. ``status``: its status code.
response_replayed = Signal()

#: The key is held by a request still running: the answer is ``409`` (after waiting, if
#: waiting is configured).
key_in_progress = Signal()

#: The key was used before for a different request: the answer is ``422``.
key_mismatch = Signal()

#: The store could not be reached. ``fail_open``: ``True`` when the view runs unprotected
#: (``IDEMPOTENCY_FAIL_OPEN``), ``False`` when the answer is ``503``.
store_unavailable = Signal()


#: Each event's signal and the level of its log record on the ``django_idempotency`` logger.
EVENTS: dict[str, tuple[Signal, int]] = {
    "key_claimed": (key_claimed, logging.DEBUG),
    "key_taken_over": (key_taken_over, logging.INFO),
    "response_stored": (response_stored, logging.DEBUG),
    "response_replayed": (response_replayed, logging.DEBUG),
    "key_in_progress": (key_in_progress, logging.INFO),
    "key_mismatch": (key_mismatch, logging.INFO),
    # INFO: a 503 is the client's to retry, and failing open logs its own WARNING.
    "store_unavailable": (store_unavailable, logging.INFO),
}


def send(event: str, store: object, request: Any, scope: str, key: str, **extra: Any) -> None:
    """Log ``event`` and send its signal; a receiver's exception is logged, never raised.

    The log record's message names the event, the scope and the key; the same values, and
    ``extra``'s, are on the record as ``idempotency_event``, ``idempotency_scope``,
    ``idempotency_key`` and ``idempotency_<name>``, for structured (JSON) log formatters.
    """
    signal, level = EVENTS[event]
    if logger.isEnabledFor(level):
        details = "".join(f" {name}={value}" for name, value in extra.items())
        fields = {f"idempotency_{name}": value for name, value in extra.items()}
        fields.update(idempotency_event=event, idempotency_scope=scope, idempotency_key=key)
        logger.log(level, "%s scope=%r key=%r%s", event, scope, key, details, extra=fields)
    if not signal.has_listeners(type(store)):
        return
    http_request = getattr(request, "_request", request)  # a DRF Request wraps Django's
    for receiver, result in signal.send_robust(
        sender=type(store), request=http_request, scope=scope, key=key, **extra
    ):
        if isinstance(result, Exception):
            logger.error(
                "A receiver of django_idempotency's %s signal raised: %r (in %r).",
                event,
                result,
                receiver,
                exc_info=result,
            )
