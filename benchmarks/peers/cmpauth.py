"""A stand-in for session or token authentication in the peer experiments."""

from __future__ import annotations

import os

from rest_framework.authentication import BaseAuthentication


class NameAuthentication(BaseAuthentication):
    """`Authorization: Bearer <name>` or a `user=<name>` cookie names the user."""

    def authenticate(self, request):
        from django.contrib.auth.models import User

        auth = request.META.get("HTTP_AUTHORIZATION", "")
        name = auth[7:] if auth.startswith("Bearer ") else request.COOKIES.get("user")
        if not name:
            return None
        if os.environ.get("STORE_DOWN") == "1":
            return User(pk=len(name), username=name), None
        user, _ = User.objects.get_or_create(username=name)
        return user, None
