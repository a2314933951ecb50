"""The ``IdempotencyKey`` model and its QuerySet."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db.models.functions import Now

from django_idempotency.models import IdempotencyKey
from tests.factories import IdempotencyKeyFactory

pytestmark = pytest.mark.django_db


def test_expired_and_live_split_keys_by_their_ttl():
    live = IdempotencyKeyFactory(completed=True)
    expired = IdempotencyKeyFactory(completed=True, expired=True)

    assert list(IdempotencyKey.objects.expired()) == [expired]
    assert list(IdempotencyKey.objects.live()) == [live]


@pytest.mark.parametrize("app_clock_offset", [timedelta(hours=-2), timedelta(hours=2)])
def test_expired_and_live_compare_on_the_database_clock(app_clock, app_clock_offset):
    ends_soon, ended = IdempotencyKeyFactory.create_batch(2)
    IdempotencyKey.objects.filter(pk=ends_soon.pk).update(expires_at=Now() + timedelta(hours=1))
    IdempotencyKey.objects.filter(pk=ended.pk).update(expires_at=Now() - timedelta(hours=1))
    # An app server whose clock is two hours off would classify one of the two wrongly.
    app_clock(app_clock_offset)

    assert list(IdempotencyKey.objects.expired()) == [ended]
    assert list(IdempotencyKey.objects.live()) == [ends_soon]


def test_key_expiring_right_now_is_expired():
    key = IdempotencyKeyFactory()
    IdempotencyKey.objects.filter(pk=key.pk).update(expires_at=Now())

    assert list(IdempotencyKey.objects.expired()) == [key]
    assert not IdempotencyKey.objects.live().exists()


def test_string_names_the_key_and_its_scope():
    key = IdempotencyKeyFactory.build(key="order-7", scope="user:42")

    assert str(key) == "order-7 (user:42)"


def test_created_at_is_set_by_the_database():
    key = IdempotencyKeyFactory()
    key.refresh_from_db()

    assert key.created_at is not None
    assert IdempotencyKey.objects.filter(pk=key.pk, created_at__lte=Now()).exists()


def test_scope_and_key_are_unique_together():
    from django.db import IntegrityError, transaction

    IdempotencyKeyFactory(scope="user:1", key="k")
    IdempotencyKeyFactory(scope="user:2", key="k")

    with pytest.raises(IntegrityError), transaction.atomic():
        IdempotencyKeyFactory(scope="user:1", key="k")


def test_factory_traits_build_the_rows_they_name():
    completed, in_progress = (
        IdempotencyKeyFactory(completed=True),
        IdempotencyKeyFactory(in_progress=True),
    )

    assert completed.state == IdempotencyKey.State.COMPLETED
    assert in_progress.state == IdempotencyKey.State.IN_PROGRESS
    assert IdempotencyKey.objects.filter(pk=in_progress.pk, lease_until__gt=Now()).exists()
    assert completed.key != in_progress.key
