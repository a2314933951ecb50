"""ASGI entry point of the demo project, e.g. ``uvicorn testproject.asgi:application``.

Run it from ``testproject/`` with the repository root on ``PYTHONPATH`` (or the package
installed), as ``manage.py`` arranges for its own commands.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

application = get_asgi_application()
