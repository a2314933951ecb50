"""factory-boy factories for the rows the tests start from."""

from __future__ import annotations

import uuid
from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from django_idempotency.models import IdempotencyKey

PASSWORD = "correct horse battery staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")
    password = factory.django.Password(PASSWORD)


class IdempotencyKeyFactory(factory.django.DjangoModelFactory):
    """A key row. Without a trait it is an unfinished claim of the atomic mode (no lease).

    Traits: ``completed`` (a stored 201 JSON answer), ``in_progress`` (a live lease-mode claim
    whose lease runs for another 30 seconds), ``expired`` (its TTL passed an hour ago).
    """

    class Meta:
        model = IdempotencyKey

    scope = "anonymous"
    key = factory.Sequence(lambda n: f"key-{n}")
    state = IdempotencyKey.State.IN_PROGRESS
    fingerprint = "0" * 64
    method = "POST"
    path = "/sync/"
    owner_token = factory.LazyFunction(lambda: uuid.uuid4().hex)
    expires_at = factory.LazyFunction(lambda: timezone.now() + timedelta(hours=24))
    lease_until = None

    class Params:
        completed = factory.Trait(
            state=IdempotencyKey.State.COMPLETED,
            response_status=201,
            response_headers=[["Content-Type", "application/json"]],
            response_body=b'{"stored": true}',
            completed_at=factory.LazyFunction(timezone.now),
        )
        in_progress = factory.Trait(
            state=IdempotencyKey.State.IN_PROGRESS,
            lease_until=factory.LazyFunction(lambda: timezone.now() + timedelta(seconds=30)),
        )
        expired = factory.Trait(
            expires_at=factory.LazyFunction(lambda: timezone.now() - timedelta(hours=1)),
        )
