"""What the protocol passes around: a key's record, a claim, a stored response, and digests.

A leaf module: it imports nothing else from the package, so every other module (the model,
the stores, the lifecycle, the adapters) can import it at module level.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

#: The states of a key's record (``IdempotencyKey.State`` holds the same values).
IN_PROGRESS = "in_progress"
COMPLETED = "completed"


def digest(value: str | list[Any] | tuple[Any, ...]) -> str:
    """The SHA-256 hex digest of ``value``: a text, or a list of JSON values encoded with
    their order kept (so ``[scope, key]`` never collides with another split of the text).

    Lone surrogates (from a ``surrogateescape``-decoded request) are encoded as they are,
    never refused.
    """
    text = value if isinstance(value, str) else json.dumps(list(value), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class StoredResponse:
    """A response as kept for replay. ``body`` is ``None`` when it could not be stored."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None


@dataclass(frozen=True)
class Record:
    """A key's record as a store sees it at one moment."""

    fingerprint: str
    state: str
    owner_token: str
    response: StoredResponse | None
    #: ``False`` once the key's TTL has passed (on the store's clock).
    live: bool
    #: Seconds left until the key's TTL passes, on the store's clock when it was read
    #: (negative once it has); ``None`` when the store cannot tell.
    expires_in: float | None = None
    #: Seconds left on an unfinished lease-mode request's lease; ``None`` when it has none.
    lease_remaining: float | None = None
    #: The phases its request committed, in order, as ``(name, result)`` pairs (or triples,
    #: ``(name, result, compensation)``, for phases with a compensation). Only the
    #: owner's record carries them: the one a claim returns, kept from an abandoned claim.
    recovery_points: tuple[tuple[Any, ...], ...] = ()

    @property
    def completed(self) -> bool:
        return self.state == COMPLETED


@dataclass(frozen=True)
class ClaimRequest:
    """What a store needs to claim a key for one request."""

    scope: str
    key: str
    fingerprint: str
    method: str
    path: str
    token: str
    ttl: timedelta
