"""Dead letters of idempotent Celery tasks: recorded past the last retry, listed, re-driven once.

Tasks run in this process (``apply()``, and ``task_always_eager`` for re-drives). The admin
is mounted by this module (``urlpatterns`` below), as in ``tests/test_admin.py``.
"""

from __future__ import annotations

import json
import uuid
from io import StringIO

import pytest

pytest.importorskip("celery", reason="celery is not installed (pip install 'celery[redis]')")

from django.contrib import admin
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db import DatabaseError
from django.urls import path, reverse

from django_idempotency import models
from django_idempotency.management.commands import idempotency_dead_letters as dead_letters_command
from django_idempotency.models import DeadLetter, DeadLetterAlreadyRedriven, DeadLetterQuerySet
from tests import celery_tasks
from tests.factories import UserFactory
from tests.models import Charge

urlpatterns = [path("admin/", admin.site.urls)]

pytestmark = [pytest.mark.django_db, pytest.mark.urls(__name__)]

UNRELIABLE = "tests.celery_tasks.unreliable"
CHANGELIST = "admin:django_idempotency_deadletter_changelist"


@pytest.fixture
def eager(settings):
    """Publishing runs the task at once, in this process, as a re-drive publishes it."""
    celery_tasks.app.conf.task_always_eager = True
    try:
        yield
    finally:
        celery_tasks.app.conf.task_always_eager = False


def new_message() -> str:
    return uuid.uuid4().hex


def dead_letter(failures: int = 3) -> tuple[str, str, DeadLetter]:
    """Run ``unreliable`` (two retries) failing ``failures`` times; its letter."""
    message, task_id = new_message(), str(uuid.uuid4())
    result = celery_tasks.unreliable.apply((message, failures), task_id=task_id)
    with pytest.raises(ConnectionError):
        result.get()
    return message, task_id, DeadLetter.objects.get(key=task_id)


def test_a_task_failing_past_its_retries_leaves_one_dead_letter():
    message, task_id, letter = dead_letter()

    assert DeadLetter.objects.filter(key=task_id).count() == 1
    assert letter.scope == f"celery:{UNRELIABLE}"
    assert letter.task_name == UNRELIABLE
    assert letter.task_id == task_id
    assert letter.arguments == [[message, 3], {}]
    assert letter.error_type == "ConnectionError"
    assert letter.error_message == f"failure 3 of {message}"
    assert letter.redriven_at is None
    assert Charge.objects.filter(note=message).count() == 0


def test_a_task_that_succeeds_within_its_retries_leaves_no_dead_letter():
    message, task_id = new_message(), str(uuid.uuid4())

    celery_tasks.unreliable.apply((message, 2), task_id=task_id).get()

    assert not DeadLetter.objects.filter(key=task_id).exists()
    assert Charge.objects.filter(note=message).count() == 1


def test_a_failure_before_the_last_retry_leaves_no_dead_letter():
    """``flaky`` has no autoretry: its first failure is at retry 0 of Celery's default 3."""
    task_id = str(uuid.uuid4())

    with pytest.raises(ConnectionError):
        celery_tasks.flaky.apply((new_message(), 1), task_id=task_id).get()

    assert not DeadLetter.objects.filter(key=task_id).exists()


def test_a_task_with_max_retries_none_never_leaves_a_dead_letter():
    event = {"id": new_message()}

    celery_tasks.retried_for_ever.apply((event,)).get()

    assert not DeadLetter.objects.filter(key=event["id"]).exists()
    assert Charge.objects.filter(note=event["id"]).count() == 1


def test_the_same_key_failing_again_updates_its_one_dead_letter():
    message, task_id, letter = dead_letter(failures=6)

    with pytest.raises(ConnectionError):
        celery_tasks.unreliable.apply((message, 6), task_id=task_id).get()

    again = DeadLetter.objects.get(pk=letter.pk)
    assert DeadLetter.objects.filter(key=task_id).count() == 1
    assert again.error_message == f"failure 6 of {message}"


def test_a_long_error_message_is_truncated():
    letter = DeadLetter.objects.record(
        scope="s",
        key="k",
        task_name="t",
        task_id="i",
        arguments=[[], {}],
        error=ValueError("x" * 5000),
    )

    assert letter.error_message == "x" * 2000
    assert letter.error_type == "ValueError"


def test_a_redrive_runs_the_task_once_and_a_second_redrive_is_refused(eager):
    message, task_id, letter = dead_letter()

    redriven = DeadLetter.objects.redrive(letter.pk)

    assert redriven.redriven_at is not None
    assert Charge.objects.filter(note=message).count() == 1
    with pytest.raises(DeadLetterAlreadyRedriven):
        DeadLetter.objects.redrive(letter.pk)
    assert Charge.objects.filter(note=message).count() == 1
    # A redelivery of the same message replays the re-driven run's result.
    celery_tasks.unreliable.apply((message, 3), task_id=task_id).get()
    assert Charge.objects.filter(note=message).count() == 1


def test_a_redrive_that_fails_again_makes_the_letter_pending_again(eager):
    message, _task_id, letter = dead_letter(failures=6)

    DeadLetter.objects.redrive(letter.pk)

    again = DeadLetter.objects.get(pk=letter.pk)
    assert again.redriven_at is None
    assert again.error_message == f"failure 6 of {message}"
    assert list(DeadLetter.objects.pending()) == [again]


def test_a_redrive_of_an_unknown_letter_is_refused():
    with pytest.raises(DeadLetterAlreadyRedriven):
        DeadLetter.objects.redrive(10**9)


# -- The admin ----------------------------------------------------------------------------------


def test_the_admin_lists_dead_letters_and_is_read_only(admin_client):
    _message, task_id, letter = dead_letter()

    response = admin_client.get(reverse(CHANGELIST))

    assert response.status_code == 200
    assert [row.pk for row in response.context["cl"].result_list] == [letter.pk]
    assert "ConnectionError: failure 3 of" in response.content.decode()
    assert admin_client.get(reverse(CHANGELIST), {"q": task_id}).context["cl"].result_count == 1
    assert (
        admin_client.get(reverse(CHANGELIST), {"redriven": "yes"}).context["cl"].result_count == 0
    )
    add = reverse("admin:django_idempotency_deadletter_add")
    assert admin_client.get(add).status_code == 403
    change = reverse("admin:django_idempotency_deadletter_change", args=[letter.pk])
    assert admin_client.get(change).status_code == 200
    assert admin_client.post(change, {"key": "changed"}).status_code == 403


def test_the_admin_refuses_lookups_on_arguments_and_errors(admin_client):
    dead_letter()

    response = admin_client.get(reverse(CHANGELIST), {"error_message__contains": "failure"})

    assert response.status_code == 400
    assert admin_client.get(reverse(CHANGELIST), {"arguments__0__0": "x"}).status_code == 400


def test_the_admin_action_redrives_once(admin_client, eager):
    message, _task_id, letter = dead_letter()
    data = {"action": "redrive", ACTION_CHECKBOX_NAME: [letter.pk]}

    first = admin_client.post(reverse(CHANGELIST), data, follow=True)
    second = admin_client.post(reverse(CHANGELIST), data, follow=True)

    assert [str(m) for m in first.context["messages"]] == ["Re-drove 1 dead letter."]
    assert [str(m) for m in second.context["messages"]] == [
        "Skipped 1 dead letter re-driven already."
    ]
    assert Charge.objects.filter(note=message).count() == 1


def test_the_admin_action_says_when_the_broker_cannot_be_reached(admin_client, monkeypatch):
    _message, _task_id, letter = dead_letter()

    def broker_down(self):
        raise ConnectionRefusedError("the broker is down")

    monkeypatch.setattr(DeadLetter, "publish", broker_down)
    data = {"action": "redrive", ACTION_CHECKBOX_NAME: [letter.pk]}

    response = admin_client.post(reverse(CHANGELIST), data, follow=True)

    assert response.status_code == 200
    assert [str(m) for m in response.context["messages"]] == [
        "Could not publish 1 dead letter (is the broker reachable?); it stays pending."
    ]
    letter.refresh_from_db()
    assert letter.redriven_at is None


def test_the_admin_action_needs_the_change_permission(client):
    user = UserFactory(is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename="view_deadletter"))
    client.force_login(user)

    response = client.get(reverse(CHANGELIST))

    assert response.status_code == 200
    assert response.context["action_form"] is None  # no action offered


# -- The command --------------------------------------------------------------------------------


def run(*args) -> str:
    out = StringIO()
    call_command("idempotency_dead_letters", *args, stdout=out)
    return out.getvalue()


def test_the_command_says_when_there_are_no_dead_letters():
    assert run() == "No dead letters.\n"


def test_the_command_lists_dead_letters():
    _message, task_id, letter = dead_letter()

    text = run()
    report = json.loads(run("--json"))

    assert text.startswith("1 dead letter:\n")
    assert f"#{letter.pk} {UNRELIABLE} key {task_id!r}" in text
    assert report["count"] == 1
    assert report["dead_letters"][0]["key"] == task_id
    assert report["dead_letters"][0]["error_type"] == "ConnectionError"


def test_the_command_redrives_once_and_refuses_a_second_time(eager):
    message, _task_id, letter = dead_letter()

    assert f"Re-drove dead letter #{letter.pk}" in run("--redrive", str(letter.pk))
    with pytest.raises(CommandError, match="re-driven already"):
        run("--redrive", str(letter.pk))
    assert Charge.objects.filter(note=message).count() == 1
    assert run("--pending") == "No dead letters.\n"


def test_the_command_refuses_an_unknown_id():
    with pytest.raises(CommandError, match="does not exist"):
        run("--redrive", "999999999")


def test_a_task_called_directly_that_fails_leaves_no_dead_letter():
    event = {"id": new_message()}

    with pytest.raises(ConnectionError):
        celery_tasks.retried_for_ever(event)

    assert not DeadLetter.objects.filter(key=event["id"]).exists()


def test_a_letter_that_cannot_be_recorded_is_logged_and_the_error_still_raised(caplog, monkeypatch):
    def fail(*args, **kwargs):
        raise DatabaseError("the database went away")

    monkeypatch.setattr(DeadLetterQuerySet, "record", fail)
    task_id = str(uuid.uuid4())

    with pytest.raises(ConnectionError):
        celery_tasks.unreliable.apply((new_message(), 3), task_id=task_id).get()

    assert not DeadLetter.objects.filter(key=task_id).exists()
    assert f"Could not record the dead letter of {UNRELIABLE}[{task_id}]" in caplog.text


def test_the_error_type_names_its_module_unless_builtin():
    letter = DeadLetter.objects.record(
        scope="s",
        key="k",
        task_name="t",
        task_id="i",
        arguments=[[], {}],
        error=DeadLetterAlreadyRedriven("x"),
    )

    assert letter.error_type == "django_idempotency.models.DeadLetterAlreadyRedriven"


def test_a_task_this_process_does_not_know_is_sent_by_name(monkeypatch):
    sent = []

    class App:
        tasks: dict = {}

        def send_task(self, name, args, kwargs, *, task_id):
            sent.append((name, args, kwargs, task_id))

    monkeypatch.setattr(models, "celery_app", App())
    letter = DeadLetter.objects.record(
        scope="s",
        key="k",
        task_name="elsewhere.task",
        task_id="id-1",
        arguments=[[1], {"a": 2}],
        error=ValueError("x"),
    )

    DeadLetter.objects.redrive(letter.pk)

    assert sent == [("elsewhere.task", [1], {"a": 2}, "id-1")]


def test_the_admin_filters_letters_not_redriven(admin_client, eager):
    _message, _task_id, redriven = dead_letter()
    _message, _task_id, pending = dead_letter()
    DeadLetter.objects.redrive(redriven.pk)

    def listed(value):
        response = admin_client.get(reverse(CHANGELIST), {"redriven": value})
        return [row.pk for row in response.context["cl"].result_list]

    assert listed("no") == [pending.pk]
    assert listed("yes") == [redriven.pk]


def test_the_command_lists_at_most_its_limit(monkeypatch):
    monkeypatch.setattr(dead_letters_command, "LIMIT", 1)
    dead_letter()
    dead_letter()

    text = run()

    assert text.startswith("2 dead letters:\n")
    assert text.endswith("  ... and 1 more.\n")


def test_the_command_reports_a_database_error(monkeypatch):
    def fail(*args, **kwargs):
        raise DatabaseError("no such table")

    monkeypatch.setattr(DeadLetterQuerySet, "count", fail)
    with pytest.raises(CommandError, match="Could not read the dead letters: no such table"):
        run()
    monkeypatch.setattr(DeadLetterQuerySet, "redrive", fail)
    with pytest.raises(CommandError, match="Could not re-drive dead letter 1: no such table"):
        run("--redrive", "1")


def test_the_command_redrives_with_json(eager):
    _message, task_id, letter = dead_letter()

    report = json.loads(run("--redrive", str(letter.pk), "--json"))

    assert report["redriven"]["key"] == task_id
    assert report["redriven"]["redriven_at"] is not None
    assert "re-driven " in run()
