"""Compatibility names: what ``django_idempotency.core`` held before it was split.

The engine now lives in one module per concern: :mod:`~django_idempotency.http` (keys, scopes,
fingerprints, responses), :mod:`~django_idempotency.lifecycle` (the run),
:mod:`~django_idempotency.phases`, :mod:`~django_idempotency.heartbeat` and
:mod:`~django_idempotency.adapters` (options and the HTTP execution). Settings and projects
name ``django_idempotency.core.user_scope`` and ``.request_fingerprint``; those and the other
names below keep working.
"""

from __future__ import annotations

from django_idempotency.adapters import Execution, Options, option_error
from django_idempotency.conf import SAFE_METHODS
from django_idempotency.heartbeat import Heartbeat as _Heartbeat
from django_idempotency.heartbeat import _Scheduler
from django_idempotency.http import (
    MAX_KEY_LENGTH,
    NEVER_STORED_HEADERS,
    REPLAYED_HEADER,
    error_response,
    parse_key,
    replay_response,
    request_fingerprint,
    storable,
    user_scope,
)
from django_idempotency.http import fit as _fit
from django_idempotency.http import stored_response as _stored_response
from django_idempotency.lifecycle import Run

__all__ = [
    "MAX_KEY_LENGTH",
    "NEVER_STORED_HEADERS",
    "REPLAYED_HEADER",
    "SAFE_METHODS",
    "Execution",
    "Options",
    "Run",
    "_Heartbeat",
    "_Scheduler",
    "_fit",
    "_stored_response",
    "error_response",
    "option_error",
    "parse_key",
    "replay_response",
    "request_fingerprint",
    "storable",
    "user_scope",
]
