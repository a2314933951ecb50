"""Rename the field ``locked_until`` to ``lease_until``, the name the docs and settings use.

Only the migration state changes: the column keeps its name (``db_column``), and the index
on (state, column) is the same index, so no SQL runs and no table is rewritten.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("django_idempotency", "0002_recovery_points"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RenameField(
                    model_name="idempotencykey",
                    old_name="locked_until",
                    new_name="lease_until",
                ),
                migrations.AlterField(
                    model_name="idempotencykey",
                    name="lease_until",
                    field=models.DateTimeField(
                        db_column="locked_until",
                        help_text=(
                            "Set in lease mode only: when an unfinished request's claim may be "
                            "taken over."
                        ),
                        null=True,
                        verbose_name="lease deadline",
                    ),
                ),
                migrations.RemoveIndex(
                    model_name="idempotencykey",
                    name="idempotency_state_lease_idx",
                ),
                migrations.AddIndex(
                    model_name="idempotencykey",
                    index=models.Index(
                        fields=["state", "lease_until"], name="idempotency_state_lease_idx"
                    ),
                ),
            ],
        ),
    ]
