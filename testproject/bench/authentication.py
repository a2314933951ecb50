"""Every benchmark request is made by one user, ``bench``, without a per-request query.

Keys are then scoped to a real user, as in a real API (one package only protects
authenticated requests), while authentication costs the same nothing for every package.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

_user: Any = None


class BenchAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Any, None]:
        global _user
        if _user is None:  # once per worker process
            _user, _ = get_user_model().objects.get_or_create(username="bench")
        return _user, None
