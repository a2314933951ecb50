"""The ``IdempotencyKey`` model: one row per (scope, key), holding the stored response."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db import models
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

if TYPE_CHECKING:
    from django.db.models.query import QuerySet


class IdempotencyKeyQuerySet(models.QuerySet["IdempotencyKey"]):
    def expired(self) -> QuerySet[IdempotencyKey]:
        """Keys whose TTL has passed, compared on the database clock."""
        return self.filter(expires_at__lte=Now())

    def live(self) -> QuerySet[IdempotencyKey]:
        """Keys whose TTL has not passed yet, compared on the database clock."""
        return self.filter(expires_at__gt=Now())


class IdempotencyKey(models.Model):
    """An idempotency key and, once its request has finished, the response to replay."""

    class State(models.TextChoices):
        IN_PROGRESS = "in_progress", _("in progress")
        COMPLETED = "completed", _("completed")

    scope = models.CharField(_("scope"), max_length=255)
    key = models.CharField(_("key"), max_length=255)
    state = models.CharField(
        _("state"), max_length=16, choices=State.choices, default=State.IN_PROGRESS
    )
    fingerprint = models.CharField(_("request fingerprint"), max_length=64)
    method = models.CharField(_("method"), max_length=16)
    path = models.CharField(_("path"), max_length=2048)
    owner_token = models.CharField(_("owner token"), max_length=32)
    response_status = models.PositiveSmallIntegerField(_("response status"), null=True)
    response_headers = models.JSONField(_("response headers"), default=list)
    response_body = models.BinaryField(
        _("response body"),
        null=True,
        help_text=_("Empty (NULL) when the response was streamed or too large to store."),
    )
    created_at = models.DateTimeField(_("created at"), db_default=Now())
    completed_at = models.DateTimeField(_("completed at"), null=True)
    expires_at = models.DateTimeField(_("expires at"))
    locked_until = models.DateTimeField(
        _("lease deadline"),
        null=True,
        help_text=_(
            "Set in lease mode only: when an unfinished request's claim may be taken over."
        ),
    )

    objects: Any = IdempotencyKeyQuerySet.as_manager()

    class Meta:
        verbose_name = _("idempotency key")
        verbose_name_plural = _("idempotency keys")
        constraints = [
            models.UniqueConstraint(fields=["scope", "key"], name="idempotency_scope_key_uniq"),
        ]
        indexes = [
            models.Index(fields=["expires_at"], name="idempotency_expires_idx"),
            models.Index(fields=["created_at"], name="idempotency_created_idx"),
            models.Index(fields=["state", "locked_until"], name="idempotency_state_lease_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.scope})"

    @property
    def has_response(self) -> bool:
        return self.state == self.State.COMPLETED and self.response_body is not None
