"""System checks for django-idempotency's settings and database."""

from __future__ import annotations

from typing import Any

from django.core import checks


def register() -> None:
    checks.register(check_database, checks.Tags.database)


def check_database(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    from django.db import connections, router

    from django_idempotency.models import IdempotencyKey

    messages: list[checks.CheckMessage] = []
    alias = router.db_for_write(IdempotencyKey)
    if databases is None or alias not in databases:
        return messages
    connection = connections[alias]
    transaction_mode = connection.settings_dict.get("OPTIONS", {}).get("transaction_mode")
    if not connection.features.has_select_for_update and transaction_mode != "IMMEDIATE":
        messages.append(
            checks.Warning(
                f"The database '{alias}' that stores idempotency keys ({connection.vendor}) has "
                "no row locks: requests are serialised by its database-wide write lock, and "
                "without OPTIONS['transaction_mode'] = 'IMMEDIATE' concurrent requests for "
                "the same key can fail with 'database is locked' instead of queueing.",
                hint=(
                    "Set DATABASES['" + alias + "']['OPTIONS']['transaction_mode'] = 'IMMEDIATE' "
                    "(Django 5.1+), and prefer PostgreSQL or MariaDB/MySQL in production."
                ),
                id="django_idempotency.W001",
            )
        )
    return messages
