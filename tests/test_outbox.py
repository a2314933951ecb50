"""The transactional outbox (``django_idempotency.outbox``): written with the writes it
announces, relayed at least once with a stable message id, deduplicated by the consumer.

Everything here runs in the test process, on every database; the relays in real processes,
killed mid-batch and several at once, are in ``tests/test_outbox_relay_processes.py``. The
admin is mounted by this module (``urlpatterns`` below), as in ``tests/test_admin.py``.
"""

from __future__ import annotations

import os
import signal
import uuid
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from types import MappingProxyType

import pytest
from django.contrib import admin
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import DatabaseError, transaction
from django.db.models.functions import Now
from django.db.transaction import TransactionManagementError
from django.urls import path, reverse
from django.utils import timezone

from django_idempotency import outbox
from django_idempotency.management.commands import idempotency_outbox_relay as relay_command
from django_idempotency.models import IdempotencyKey, OutboxEvent
from django_idempotency.outbox import RelayResult, add_event, relay, relay_batch
from tests import outbox_publishers
from tests.models import Charge

urlpatterns = [path("admin/", admin.site.urls)]

pytestmark = pytest.mark.urls(__name__)

RECORD = "tests.outbox_publishers.record"
FLAKY = "tests.outbox_publishers.flaky"
CONSUMER = "tests.celery_tasks.outbox_consumer"
CHANGELIST = "admin:django_idempotency_outboxevent_changelist"


@pytest.fixture(autouse=True)
def publishers(settings):
    """Every topic goes to ``record``, except ``orders.flaky`` and the Celery consumer."""
    settings.IDEMPOTENCY_OUTBOX_PUBLISHERS = {
        "*": RECORD,
        "orders.flaky": FLAKY,
        CONSUMER: "django_idempotency.celery.publish_task",
    }
    outbox_publishers.DELIVERED.clear()
    outbox_publishers.FAILING.clear()
    yield settings.IDEMPOTENCY_OUTBOX_PUBLISHERS
    outbox_publishers.DELIVERED.clear()
    outbox_publishers.FAILING.clear()


def add(topic: str = "orders.created", payload=None, **options) -> OutboxEvent:
    with transaction.atomic():
        return add_event(topic, {"order": 1} if payload is None else payload, **options)


def delivered_ids() -> list[str]:
    return [message_id for _topic, message_id, _payload, _headers in outbox_publishers.DELIVERED]


# -- Writing events --------------------------------------------------------------------------


@pytest.mark.django_db
def test_an_event_is_published_once_with_its_message_id_and_marked_published():
    event = add("orders.created", {"order": 7}, headers={"trace": "abc"})

    first = relay()
    second = relay()

    assert first == RelayResult(published=1, failed=0)
    assert second == RelayResult(published=0, failed=0)
    delivered = outbox_publishers.DELIVERED
    assert delivered == [("orders.created", str(event.message_id), {"order": 7}, {"trace": "abc"})]
    event.refresh_from_db()
    assert event.published_at is not None
    assert event.attempts == 1
    assert event.last_error == ""
    assert list(OutboxEvent.objects.pending()) == []


@pytest.mark.django_db
def test_an_event_rolled_back_with_its_writes_is_never_published():
    def place_order():
        with transaction.atomic():
            Charge.objects.create(amount=1, note="rolled back")
            add_event("orders.created", {"order": 1})
            raise RuntimeError("the order failed")

    with pytest.raises(RuntimeError, match="the order failed"):
        place_order()

    assert relay() == RelayResult()
    assert outbox_publishers.DELIVERED == []
    assert not OutboxEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_event_outside_a_transaction_is_refused():
    with pytest.raises(TransactionManagementError, match=r"inside transaction\.atomic\(\)"):
        add_event("orders.created", {"order": 1})

    assert not OutboxEvent.objects.exists()


@pytest.mark.django_db
def test_a_topic_without_a_publisher_is_refused(publishers):
    del publishers["*"]

    with pytest.raises(ImproperlyConfigured, match=r"no publisher for the outbox topic 'x\.y'"):
        add("x.y")

    assert not OutboxEvent.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("topic", ["", "*", "t" * 256, 42, "orders\x00created"])
def test_a_malformed_topic_is_refused(topic):
    with pytest.raises(ValueError, match="An outbox topic must be a string of 1 to 255"):
        add(topic)


@pytest.mark.django_db
def test_a_payload_that_is_not_json_is_refused_naming_the_topic():
    with pytest.raises(TypeError, match=r"The payload of the outbox event 'orders\.created'"):
        add("orders.created", {"order": object()})


@pytest.mark.django_db
@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_a_payload_holding_nan_or_infinity_is_refused_naming_the_topic(number):
    # Not JSON: SQLite's CHECK constraint and PostgreSQL's json type refused them (500s).
    with pytest.raises(TypeError, match=r"The payload of the outbox event 'orders\.created'"):
        add("orders.created", {"total": number})

    assert not OutboxEvent.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("payload", "headers", "problem"),
    [
        ({"note": "a\x00b"}, None, r"The payload of .* holds a NUL character"),
        ({"a\x00b": 1}, None, r"The payload of .* holds a NUL character"),
        ([["\x00"]], None, r"The payload of .* holds a NUL character"),
        ({"order": 1}, {"trace": "a\x00b"}, r"The headers of .* without NUL characters"),
    ],
)
def test_a_nul_character_is_refused_on_every_database(payload, headers, problem):
    # PostgreSQL refused it with a DataError at INSERT, breaking the caller's transaction.
    with pytest.raises(TypeError, match=problem):
        add(payload=payload, headers=headers)

    assert not OutboxEvent.objects.exists()


@pytest.mark.django_db
def test_headers_may_be_any_mapping():
    event = add(headers=MappingProxyType({"trace": "abc"}))  # was a TypeError at INSERT

    event.refresh_from_db()
    assert event.headers == {"trace": "abc"}


@pytest.mark.django_db
@pytest.mark.parametrize("value", [["orders"], RECORD, None, {"*": 5}])
def test_a_malformed_publishers_setting_is_named_where_no_check_ran(settings, value):
    event = add()
    settings.IDEMPOTENCY_OUTBOX_PUBLISHERS = value

    with pytest.raises(ImproperlyConfigured, match=r"\(django_idempotency\.E030\) "):
        add()
    with pytest.raises(ImproperlyConfigured, match=r"IDEMPOTENCY_OUTBOX_PUBLISHERS "):
        relay_batch()
    with pytest.raises(CommandError, match=r"IDEMPOTENCY_OUTBOX_PUBLISHERS "):
        run("--once")  # call_command() runs no checks

    # The event waits for the setting to be fixed, untouched: no failed attempt recorded.
    event.refresh_from_db()
    assert (event.attempts, event.last_error, event.published_at) == (0, "", None)


@pytest.mark.django_db
def test_headers_must_map_strings_to_strings():
    with pytest.raises(TypeError, match="must map strings to strings"):
        add(headers={"attempt": 1})


@pytest.mark.django_db
def test_the_publisher_gets_the_payloads_json_round_trip():
    event = add(payload={"amount": Decimal("19.99"), "id": uuid.UUID(int=1)})

    relay()

    stored = {"amount": "19.99", "id": str(uuid.UUID(int=1))}
    assert event.payload == stored
    assert outbox_publishers.DELIVERED[0][2] == stored


# -- The relay ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_failed_publish_backs_off_and_the_rest_of_the_batch_still_goes():
    outbox_publishers.FAILING.add("orders.flaky")
    before = add("orders.created", {"n": 1})
    failing = add("orders.flaky", {"n": 2})
    after = add("orders.created", {"n": 3})

    result = relay()

    assert result == RelayResult(published=2, failed=1)
    assert delivered_ids() == [str(before.message_id), str(after.message_id)]
    failing.refresh_from_db()
    assert failing.published_at is None
    assert failing.attempts == 1
    assert failing.last_error == "ConnectionError: the broker is down for orders.flaky"
    # Not due for another 2 seconds: a relay now leaves it alone.
    assert list(OutboxEvent.objects.failing()) == [failing]
    assert not OutboxEvent.objects.due().exists()
    assert relay() == RelayResult()

    outbox_publishers.FAILING.clear()
    OutboxEvent.objects.filter(pk=failing.pk).update(available_at=Now() - timedelta(seconds=1))
    assert relay() == RelayResult(published=1, failed=0)
    failing.refresh_from_db()
    assert failing.published_at is not None
    assert failing.attempts == 2
    assert failing.last_error == ""


@pytest.mark.django_db
@pytest.mark.parametrize(("attempts", "delay"), [(0, 2), (1, 4), (4, 32), (30, 600)])
def test_the_next_attempt_waits_twice_as_long_up_to_ten_minutes(attempts, delay):
    outbox_publishers.FAILING.add("orders.flaky")
    event = add("orders.flaky")
    OutboxEvent.objects.filter(pk=event.pk).update(attempts=attempts)
    start = timezone.now()

    relay()

    event.refresh_from_db()
    assert event.attempts == attempts + 1
    waited = (event.available_at - start).total_seconds()
    assert delay - 5 <= waited <= delay + 5


@pytest.mark.django_db
def test_a_topic_whose_publisher_is_gone_fails_its_events_only(publishers):
    kept = add("orders.created")
    gone = add("orders.gone")
    publishers["orders.gone"] = "tests.outbox_publishers.no_such_publisher"

    assert relay() == RelayResult(published=1, failed=1)

    gone.refresh_from_db()
    assert "cannot be imported" in gone.last_error
    assert delivered_ids() == [str(kept.message_id)]


@pytest.mark.django_db
def test_a_relay_that_dies_before_marking_publishes_every_event_again_with_its_message_id(
    monkeypatch,
):
    events = [add(payload={"n": n}) for n in range(3)]

    def publish_then_die(event):
        outbox_publishers.record(event)
        if len(outbox_publishers.DELIVERED) == 2:
            raise SystemExit("the relay process was killed")  # not a publisher's failure

    monkeypatch.setattr(outbox, "publisher_for", lambda topic: publish_then_die)
    with pytest.raises(SystemExit):
        relay()
    # Nothing was marked: both deliveries so far are lost to the relay, not to the consumer.
    assert OutboxEvent.objects.pending().count() == 3
    monkeypatch.undo()

    assert relay() == RelayResult(published=3, failed=0)

    ids = [str(event.message_id) for event in events]
    assert delivered_ids() == ids[:2] + ids
    assert not OutboxEvent.objects.pending().exists()


@pytest.mark.django_db
def test_a_batch_publishes_at_most_its_size_and_relay_runs_batches_until_none_is_due():
    events = [add(payload={"n": n}) for n in range(5)]

    assert relay_batch(batch_size=2) == RelayResult(published=2)
    assert relay(batch_size=2, max_batches=1) == RelayResult(published=2)
    assert relay(batch_size=2) == RelayResult(published=1)
    assert delivered_ids() == [str(event.message_id) for event in events]


@pytest.mark.django_db
def test_the_batch_size_defaults_to_its_setting(settings):
    settings.IDEMPOTENCY_OUTBOX_BATCH_SIZE = 2
    for n in range(3):
        add(payload={"n": n})

    assert relay_batch() == RelayResult(published=2)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer from 1 to 10,000"),
        ({"batch_size": True}, "batch_size must be an integer from 1 to 10,000"),
        ({"batch_size": 10**23}, "batch_size must be an integer from 1 to 10,000"),
        ({"max_batches": 0}, "max_batches must be a positive integer"),
    ],
)
def test_relay_refuses_bad_sizes(options, message):
    with pytest.raises(ValueError, match=message):
        relay(**options)


# -- Purging published events ------------------------------------------------------------------


@pytest.mark.django_db
def test_purge_deletes_old_published_events_only():
    old, recent, pending = add(), add(), add()
    OutboxEvent.objects.filter(pk=old.pk).update(published_at=Now() - timedelta(days=8))
    OutboxEvent.objects.filter(pk=recent.pk).update(published_at=Now() - timedelta(days=6))

    deleted = OutboxEvent.objects.purge_published(older_than=timedelta(days=7), batch_size=1)

    assert deleted == 1
    assert set(OutboxEvent.objects.values_list("pk", flat=True)) == {recent.pk, pending.pk}


@pytest.mark.django_db
def test_purge_refuses_a_negative_age():
    with pytest.raises(ValueError, match="older_than must be a timedelta of zero or more"):
        OutboxEvent.objects.purge_published(older_than=timedelta(seconds=-1))


# -- Celery: the task id is the message id ---------------------------------------------------


@pytest.fixture
def eager():
    celery_tasks = pytest.importorskip("tests.celery_tasks", reason="celery is not installed")
    celery_tasks.app.conf.task_always_eager = True
    try:
        yield celery_tasks
    finally:
        celery_tasks.app.conf.task_always_eager = False


@pytest.mark.django_db
def test_an_event_published_three_times_to_an_idempotent_task_has_one_effect(eager):
    from django_idempotency.celery import publish_task

    event = add(CONSUMER, {"note": "order-1", "amount": 5})
    for _ in range(3):  # a relay that dies twice between publishing and marking
        publish_task(event)

    assert Charge.objects.filter(note="order-1").count() == 1
    key = eager.outbox_consumer.name
    assert IdempotencyKey.objects.filter(scope=f"celery:{key}", key=str(event.message_id)).exists()


@pytest.mark.django_db
def test_an_unknown_task_is_sent_by_name_with_the_message_id_and_headers(eager, monkeypatch):
    from django_idempotency import celery as idempotency_celery

    sent = []
    monkeypatch.setattr(
        idempotency_celery.current_app,
        "send_task",
        lambda name, args, **options: sent.append((name, args, options)),
    )
    event = add("elsewhere.tasks.notify", {"order": 3}, headers={"tenant": "acme"})

    idempotency_celery.publish_task(event)

    assert sent == [
        (
            "elsewhere.tasks.notify",
            ({"order": 3},),
            {"task_id": str(event.message_id), "headers": {"tenant": "acme"}},
        )
    ]


@pytest.mark.django_db
def test_the_beat_task_relays_due_events(eager):
    from django_idempotency.celery import relay_outbox

    add(CONSUMER, {"note": "order-2", "amount": 5})
    add("orders.created")

    result = relay_outbox.apply(kwargs={"batch_size": 1}).get()

    assert result == {"published": 2, "failed": 0}
    assert Charge.objects.filter(note="order-2").count() == 1
    assert not OutboxEvent.objects.pending().exists()


# -- The command ---------------------------------------------------------------------------------


def run(*args: str) -> str:
    out = StringIO()
    call_command("idempotency_outbox_relay", *args, stdout=out, stderr=out)
    return out.getvalue()


@pytest.mark.django_db
def test_the_command_publishes_every_due_event_once():
    for n in range(3):
        add(payload={"n": n})

    assert run("--once", "--batch-size", "2") == "Published 3 outbox events.\n"
    assert run("--once") == "No outbox events due.\n"
    assert len(outbox_publishers.DELIVERED) == 3


@pytest.mark.django_db
def test_the_command_says_when_events_failed():
    outbox_publishers.FAILING.add("orders.flaky")
    add("orders.flaky")
    add()

    assert run("--once") == "Published 1 outbox event; 1 failed and will be retried.\n"


@pytest.mark.django_db
def test_the_command_purges_old_published_events():
    event = add()
    OutboxEvent.objects.filter(pk=event.pk).update(published_at=Now() - timedelta(days=2))

    output = run("--once", "--purge-older-than", "1d")

    assert output == "No outbox events due.\nDeleted 1 published outbox event.\n"
    assert not OutboxEvent.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be an integer from 1 to 10,000, not '0'"),
        (["--batch-size", "x"], "--batch-size must be an integer from 1 to 10,000, not 'x'"),
        (["--batch-size", "1" + "0" * 23], "--batch-size must be an integer from 1 to 10,000"),
        (["--interval", "0"], "--interval must be a number of seconds"),
        (["--interval", "soon"], "--interval must be a number of seconds"),
        (["--purge-older-than", "7 days"], "--purge-older-than must be a duration"),
        (["--purge-older-than", "99999999999d"], "--purge-older-than must be a duration of at"),
        (["--purge-older-than", "36501d"], "--purge-older-than must be a duration of at most"),
        (["--database", "nope"], "--database names 'nope', which is not in DATABASES"),
    ],
)
def test_the_command_refuses_bad_arguments(args, message):
    with pytest.raises(CommandError, match=message):
        run("--once", *args)


@pytest.mark.django_db
def test_the_command_refuses_a_bad_batch_size_setting_where_no_check_ran(settings):
    settings.IDEMPOTENCY_OUTBOX_BATCH_SIZE = 0

    with pytest.raises(CommandError, match=r"IDEMPOTENCY_OUTBOX_BATCH_SIZE must be an integer"):
        run("--once")


@pytest.mark.django_db
def test_the_command_reports_a_database_error_with_once(monkeypatch):
    def broken(**options):
        raise DatabaseError("the database is gone")

    monkeypatch.setattr(relay_command, "relay", broken)

    with pytest.raises(CommandError, match="Could not relay the outbox: the database is gone"):
        run("--once")


def old_published_event() -> OutboxEvent:
    event = add("orders.old")
    OutboxEvent.objects.filter(pk=event.pk).update(published_at=Now() - timedelta(days=2))
    return event


@pytest.mark.django_db(transaction=True)  # the loop closes a connection left unusable
def test_the_loop_survives_a_database_error_and_stops_on_sigterm(monkeypatch):
    old_published_event()
    add()
    add()
    passes = []

    def flaky_relay(**options):
        passes.append(options)
        if len(passes) == 1:
            raise DatabaseError("the database restarted")
        if len(passes) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a supervisor stops the relay
        return relay(**options)

    monkeypatch.setattr(relay_command, "relay", flaky_relay)
    previous = signal.getsignal(signal.SIGTERM)

    output = run("--interval", "0.01", "--purge-older-than", "1d", "--batch-size", "1")

    # The purge that the database error stopped ran on the next pass.
    assert output.splitlines() == [
        "Could not relay the outbox: the database restarted",
        "Published 2 outbox events.",
        "Deleted 1 published outbox event.",
        "Stopped.",
    ]
    assert len(passes) == 3
    assert signal.getsignal(signal.SIGTERM) is previous
    assert list(OutboxEvent.objects.values_list("topic", flat=True)) == ["orders.created"] * 2


def stop_on_first_pass(monkeypatch):
    def relay_then_stop(**options):
        os.kill(os.getpid(), signal.SIGTERM)
        return relay(**options)

    monkeypatch.setattr(relay_command, "relay", relay_then_stop)


@pytest.mark.django_db(transaction=True)
def test_the_loop_reports_a_purge_even_when_nothing_was_published(monkeypatch):
    old_published_event()
    stop_on_first_pass(monkeypatch)

    output = run("--purge-older-than", "1d")

    assert output == "Deleted 1 published outbox event.\nStopped.\n"


@pytest.mark.django_db(transaction=True)
def test_the_loop_prints_nothing_at_verbosity_zero(monkeypatch):
    add()
    stop_on_first_pass(monkeypatch)

    output = run("--verbosity", "0")

    assert output == ""
    assert not OutboxEvent.objects.pending().exists()


# -- Checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["orders"], "must be a dict of outbox topics"),
        ({"": RECORD}, "must be a dict of outbox topics"),
        ({"orders": "tests.outbox_publishers.nothing"}, "['orders'] names"),
        ({"orders": "tests.outbox_publishers.DELIVERED"}, "which is not callable"),
    ],
)
def test_a_bad_publishers_setting_fails_the_checks(settings, value, message):
    settings.IDEMPOTENCY_OUTBOX_PUBLISHERS = value

    errors = [error for error in run_checks() if error.id == "django_idempotency.E030"]

    assert len(errors) == 1
    assert message in errors[0].msg
    assert errors[0].msg.startswith("IDEMPOTENCY_OUTBOX_PUBLISHERS ")


@pytest.mark.parametrize("size", [0, 10_001, 10**23])
def test_a_bad_batch_size_fails_the_checks(settings, size):
    settings.IDEMPOTENCY_OUTBOX_BATCH_SIZE = size

    errors = [error for error in run_checks() if error.id == "django_idempotency.E031"]

    assert [error.msg for error in errors] == [
        f"IDEMPOTENCY_OUTBOX_BATCH_SIZE must be an integer from 1 to 10,000, not {size!r} (int)."
    ]


# -- The admin -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_admin_lists_events_by_state_and_is_read_only(admin_client):
    outbox_publishers.FAILING.add("orders.flaky")
    published = add("orders.created")
    relay()
    failing = add("orders.flaky")
    relay()
    pending = add("orders.pending")
    url = reverse(CHANGELIST)

    page = admin_client.get(url).content.decode()
    assert str(published.message_id) in page
    assert "failing: ConnectionError: the broker is down" in page
    assert "Add outbox event" not in page

    only_failing = admin_client.get(url, {"outbox_state": "failing"}).content.decode()
    assert str(failing.message_id) in only_failing
    assert str(pending.message_id) not in only_failing
    only_pending = admin_client.get(url, {"outbox_state": "pending"}).content.decode()
    assert str(pending.message_id) in only_pending
    assert str(published.message_id) not in only_pending
    only_published = admin_client.get(url, {"outbox_state": "published"}).content.decode()
    assert str(published.message_id) in only_published
    assert str(pending.message_id) not in only_published

    change = reverse("admin:django_idempotency_outboxevent_change", args=[failing.pk])
    detail = admin_client.get(change).content.decode()
    assert f"orders.flaky {failing.message_id}" in detail  # the title
    assert "ConnectionError: the broker is down for orders.flaky" in detail
    assert admin_client.post(change, {"topic": "changed"}).status_code == 403
    failing.refresh_from_db()
    assert failing.topic == "orders.flaky"


@pytest.mark.django_db
def test_the_admin_searches_topics_and_message_ids_exactly(admin_client):
    first, second = add("orders.created"), add("orders.shipped")
    url = reverse(CHANGELIST)

    by_id = admin_client.get(url, {"q": str(second.message_id)}).content.decode()
    by_topic = admin_client.get(url, {"q": "orders.created"}).content.decode()
    partial = admin_client.get(url, {"q": "orders"}).content.decode()

    assert str(second.message_id) in by_id
    assert str(first.message_id) not in by_id
    assert str(first.message_id) in by_topic
    assert str(second.message_id) not in by_topic
    assert str(first.message_id) not in partial
    assert str(second.message_id) not in partial


@pytest.mark.django_db
def test_the_admin_refuses_lookups_on_payloads(admin_client):
    response = admin_client.get(reverse(CHANGELIST), {"payload__contains": "secret"})

    assert response.status_code == 400
