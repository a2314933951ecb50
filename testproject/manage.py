#!/usr/bin/env python
"""Django's command-line utility for the django-idempotency demo project."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The repository root, so that ``django_idempotency`` imports from the working tree without
# being installed. It goes after this directory (sys.path[0]), which holds the project itself.
REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(1, str(REPO_ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
