"""Conditional updates (RFC 9110): entity tags of a resource's version, ``If-Match``, and the
compare-and-set that checks and increments the version in one ``UPDATE``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from django.db import models, router, transaction
from django.db.models import F
from django.http import HttpResponse

from django_idempotency.exceptions import IdempotencyPreconditionFailed, PreconditionError

__all__ = ["IfMatch", "compare_and_set", "format_etag", "parse_if_match", "precondition_response"]

# RFC 9110 section 8.8.3: entity-tag = [ weak ] opaque-tag; opaque-tag = DQUOTE *etagc DQUOTE;
# etagc = %x21 / %x23-7E / obs-text. A comma is an etagc, so a list is split by this pattern,
# never by commas.
_ENTITY_TAG = re.compile(r'[ \t]*(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|$)')


def format_etag(version: int, *, pk: object = None) -> str:
    """The strong entity tag of ``version``: ``"3"``, or ``"42.3"`` with the primary key."""
    return f'"{version}"' if pk is None else f'"{pk}.{version}"'


@dataclass(frozen=True)
class IfMatch:
    """A parsed ``If-Match`` header: ``*``, or the strong entity tags it lists.

    Weak tags are dropped as they are read: RFC 9110 section 13.1.1 compares ``If-Match``
    strongly, so a weak tag never matches. A malformed header matches nothing.
    """

    any: bool = False
    tags: frozenset[str] = frozenset()

    def matches(self, etag: str) -> bool:
        """Whether the current representation's (strong) ``etag`` passes this precondition."""
        return self.any or etag in self.tags


def parse_if_match(value: str | None) -> IfMatch | None:
    """The ``If-Match`` header ``value`` parsed; ``None`` when there is no header.

    Repeated headers arrive joined by commas (as WSGI and ASGI servers join them), which is
    the same list.
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if value == "*":
        return IfMatch(any=True)
    tags: set[str] = set()
    position = 0
    while position < len(value):
        match = _ENTITY_TAG.match(value, position)
        if match is None:
            return IfMatch()  # malformed (or "*" inside a list): it matches nothing
        if match.group(1) is None:
            tags.add(match.group(2))
        position = match.end()
    return IfMatch(tags=frozenset(tags))


def compare_and_set(
    queryset_or_model: models.QuerySet[Any] | type[models.Model],
    pk: object,
    expected_version: int | None,
    version_field: str = "version",
) -> int:
    """Check that row ``pk`` holds ``expected_version`` and increment it, in one ``UPDATE``.

    ``UPDATE ... SET version = version + 1 WHERE pk = %s AND version = %s``: the database
    compares and writes under the row lock the ``UPDATE`` takes, so of two writers expecting
    the same version exactly one succeeds, and the lock is held until the caller's
    transaction ends, so the rest of its write cannot interleave with another writer's.
    Call it inside ``transaction.atomic()`` together with that write.

    ``expected_version=None`` accepts any version (``If-Match: *``, or no precondition).
    Returns the new version; raises :class:`IdempotencyPreconditionFailed` when the row does
    not hold ``expected_version`` or no longer exists.
    """
    if isinstance(queryset_or_model, models.QuerySet):
        queryset = queryset_or_model
    else:
        queryset = queryset_or_model._default_manager.all()
    using = router.db_for_write(queryset.model)
    rows = queryset.using(using).filter(pk=pk)
    if expected_version is not None:
        rows = rows.filter(**{version_field: expected_version})
    with transaction.atomic(using=using):
        if not rows.update(**{version_field: F(version_field) + 1}):
            raise IdempotencyPreconditionFailed()
        if expected_version is not None:
            return expected_version + 1
        # The row is locked by the UPDATE above until the transaction ends: this read sees
        # the version it wrote, not one of another writer.
        version: int = rows.values_list(version_field, flat=True).get()
        return version


def precondition_response(exc: PreconditionError) -> HttpResponse:
    """The RFC 9457 problem+json response for a ``412`` or ``428``. Never stored."""
    return HttpResponse(
        json.dumps(exc.problem()), status=exc.status_code, content_type="application/problem+json"
    )
