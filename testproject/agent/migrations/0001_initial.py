"""Refunds issued by the agent's ``issue_refund`` tool."""

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Refund",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "reference",
                    models.CharField(max_length=64, unique=True, verbose_name="refund reference"),
                ),
                (
                    "order_id",
                    models.CharField(db_index=True, max_length=64, verbose_name="order"),
                ),
                ("amount", models.DecimalField(decimal_places=2, max_digits=12)),
                ("currency", models.CharField(max_length=3)),
                ("reason", models.CharField(blank=True, max_length=200)),
                (
                    "tool_call_id",
                    models.CharField(db_index=True, max_length=255, verbose_name="tool call id"),
                ),
                ("created", models.DateTimeField(auto_now_add=True)),
            ],
            options={"ordering": ["created", "pk"]},
        ),
    ]
