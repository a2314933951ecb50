"""The model and its migrations never drift, whatever the project's ``DEFAULT_AUTO_FIELD``."""

from __future__ import annotations

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.django_db
def test_makemigrations_finds_no_changes():
    out = StringIO()

    call_command("makemigrations", "django_idempotency", check=True, dry_run=True, stdout=out)

    assert "No changes detected" in out.getvalue()


# Run in a fresh interpreter: models are built at startup from the settings of that moment.
CHECK_WITH_AUTO_FIELD = """
import sys
import django
from django.conf import settings
from tests import settings as test_settings

values = {name: getattr(test_settings, name) for name in dir(test_settings) if name.isupper()}
values["DEFAULT_AUTO_FIELD"] = sys.argv[1]
values["DATABASES"] = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
settings.configure(**values)
django.setup()

from django.core.management import call_command
from django_idempotency.models import IdempotencyKey

assert type(IdempotencyKey._meta.pk).__name__ == "BigAutoField", IdempotencyKey._meta.pk
call_command("makemigrations", "django_idempotency", check=True, dry_run=True)
"""


@pytest.mark.parametrize(
    "auto_field", ["django.db.models.AutoField", "django.db.models.SmallAutoField"]
)
def test_makemigrations_finds_no_changes_with_another_default_auto_field(auto_field):
    env = {name: value for name, value in os.environ.items() if name != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", CHECK_WITH_AUTO_FIELD, auto_field],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "No changes detected" in result.stdout
