"""The app configuration: pins the auto field and registers the system checks."""

from __future__ import annotations

from django.apps import AppConfig, apps
from django.utils.translation import gettext_lazy as _


class DjangoIdempotencyConfig(AppConfig):
    name = "django_idempotency"
    verbose_name = _("django-idempotency")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_idempotency import checks

        checks.register()
        if apps.is_installed("drf_spectacular"):
            # Registers the OpenAPI view extension (drf-spectacular's documented place for it).
            from django_idempotency import openapi  # noqa: F401
