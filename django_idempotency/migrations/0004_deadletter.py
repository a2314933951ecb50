"""Add ``DeadLetter``: Celery task deliveries that failed past their retries, one per key."""

import django.core.serializers.json
import django.db.models.functions.datetime
from django.db import migrations, models

import django_idempotency.models


class Migration(migrations.Migration):
    dependencies = [
        ("django_idempotency", "0003_lease_until"),
    ]

    operations = [
        migrations.CreateModel(
            name="DeadLetter",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "scope",
                    django_idempotency.models.ExactCharField(max_length=255, verbose_name="scope"),
                ),
                (
                    "key",
                    django_idempotency.models.ExactCharField(max_length=255, verbose_name="key"),
                ),
                ("task_name", models.CharField(max_length=255, verbose_name="task name")),
                ("task_id", models.CharField(max_length=255, verbose_name="task id")),
                (
                    "arguments",
                    models.JSONField(
                        encoder=django.core.serializers.json.DjangoJSONEncoder,
                        help_text="The task's positional and keyword arguments: [args, kwargs].",
                        verbose_name="arguments",
                    ),
                ),
                ("error_type", models.CharField(max_length=255, verbose_name="error type")),
                ("error_message", models.TextField(blank=True, verbose_name="error message")),
                (
                    "created_at",
                    models.DateTimeField(
                        db_default=django.db.models.functions.datetime.Now(),
                        verbose_name="created at",
                    ),
                ),
                (
                    "redriven_at",
                    models.DateTimeField(blank=True, null=True, verbose_name="re-driven at"),
                ),
            ],
            options={
                "verbose_name": "dead letter",
                "verbose_name_plural": "dead letters",
                "indexes": [
                    models.Index(fields=["created_at", "id"], name="idempotency_dl_created_idx"),
                ],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("scope", "key"), name="idempotency_deadletter_scope_key_uniq"
                    ),
                ],
            },
        ),
    ]
