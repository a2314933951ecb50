"""Add ``OutboxEvent``: the transactional outbox, published by its relay."""

import uuid

import django.core.serializers.json
import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("django_idempotency", "0004_deadletter"),
    ]

    operations = [
        migrations.CreateModel(
            name="OutboxEvent",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "message_id",
                    models.UUIDField(
                        default=uuid.uuid4,
                        editable=False,
                        help_text=(
                            "The same on every publication of the event: consumers "
                            "deduplicate on it."
                        ),
                        verbose_name="message id",
                    ),
                ),
                ("topic", models.CharField(max_length=255, verbose_name="topic")),
                (
                    "payload",
                    models.JSONField(
                        encoder=django.core.serializers.json.DjangoJSONEncoder,
                        verbose_name="payload",
                    ),
                ),
                ("headers", models.JSONField(blank=True, default=dict, verbose_name="headers")),
                (
                    "created_at",
                    models.DateTimeField(
                        db_default=django.db.models.functions.datetime.Now(),
                        verbose_name="created at",
                    ),
                ),
                (
                    "available_at",
                    models.DateTimeField(
                        db_default=django.db.models.functions.datetime.Now(),
                        help_text=(
                            "The relay leaves the event alone until then (after a failed attempt)."
                        ),
                        verbose_name="next attempt at",
                    ),
                ),
                (
                    "attempts",
                    models.PositiveIntegerField(
                        default=0,
                        help_text="Attempts to publish the event that ended, published or failed.",
                        verbose_name="attempts",
                    ),
                ),
                ("last_error", models.TextField(blank=True, verbose_name="last error")),
                (
                    "published_at",
                    models.DateTimeField(blank=True, null=True, verbose_name="published at"),
                ),
            ],
            options={
                "verbose_name": "outbox event",
                "verbose_name_plural": "outbox events",
                "indexes": [
                    models.Index(
                        fields=["published_at", "available_at", "id"], name="idempotency_outbox_idx"
                    )
                ],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("message_id",), name="idempotency_outbox_message_uniq"
                    )
                ],
            },
        ),
    ]
