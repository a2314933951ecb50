"""``IdempotencyKey.objects.abandoned()``, ``complete_abandoned()`` and the
``idempotency_abandoned`` command: requests that stopped mid-way and were never retried."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db.models.functions import Now
from django.test import Client

from django_idempotency.exceptions import IdempotencyResponseNotStored
from django_idempotency.functions import idempotent_call
from django_idempotency.models import IdempotencyKey
from tests.factories import IdempotencyKeyFactory
from tests.models import Charge

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls("tests.reliability_views")]


@pytest.fixture(autouse=True)
def hold_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RELIABILITY_HOLD_DIR", str(tmp_path))


def abandon(key, *, fail="after-order", note="n"):
    """A phased checkout that failed at ``fail``: its key keeps its recovery points."""
    response = Client(raise_request_exception=False).post(
        f"/phased/?note={note}",
        {"amount": 7},
        content_type="application/json",
        headers={"Idempotency-Key": key, "X-Fail": fail},
    )
    assert response.status_code == 500


def run(*args):
    out = StringIO()
    call_command("idempotency_abandoned", *args, stdout=out)
    return out.getvalue()


def test_abandoned_keys_are_stale_keys_with_recovery_points():
    abandon("mid-way")
    IdempotencyKeyFactory(key="never-started", lease_until=None)  # atomic claim, fresh
    died = IdempotencyKeyFactory(key="died-early", in_progress=True)
    IdempotencyKey.objects.filter(pk=died.pk).update(lease_until=Now() - timedelta(minutes=1))
    IdempotencyKeyFactory(key="done", completed=True)
    running = IdempotencyKeyFactory(key="running", in_progress=True)
    IdempotencyKey.objects.filter(pk=running.pk).update(recovery_points=[["order", 1]])

    assert list(IdempotencyKey.objects.abandoned().values_list("key", flat=True)) == ["mid-way"]
    assert set(IdempotencyKey.objects.stale().values_list("key", flat=True)) == {
        "mid-way",
        "died-early",
    }


def test_the_command_lists_abandoned_requests_and_their_phases():
    abandon("k1")
    abandon("k2", fail="in-receipt")

    output = run()

    assert "2 requests abandoned mid-way:" in output
    assert "anonymous 'k1': POST /phased/, stopped after order (phases: order)" in output
    assert "anonymous 'k2': POST /phased/, stopped after payment (phases: order, payment)" in (
        output
    )


def test_the_command_prints_json_and_filters_by_scope_and_key():
    abandon("k1")
    abandon("k2")

    report = json.loads(run("--json", "--key", "k2"))

    assert report["count"] == 1
    [entry] = report["keys"]
    assert entry["key"] == "k2"
    assert entry["scope"] == "anonymous"
    assert entry["recovery_point"] == "order"
    assert entry["phases"] == ["order"]
    assert json.loads(run("--json", "--scope", "other"))["count"] == 0


def test_the_command_says_when_there_is_nothing_abandoned():
    assert run() == "No requests abandoned mid-way.\n"
    assert run("--all") == "No requests stale unfinished.\n"


def test_complete_marks_them_finished_and_retries_get_409_never_a_rerun():
    abandon("k1")

    output = run("--complete", "--status", "502")

    assert "Completed 1 key without a response (original status 502)" in output
    row = IdempotencyKey.objects.get(key="k1")
    assert row.state == IdempotencyKey.State.COMPLETED
    assert row.response_status == 502
    assert row.response_body is None
    retry = Client().post(
        "/phased/?note=n", {"amount": 7}, "application/json", headers={"Idempotency-Key": "k1"}
    )
    assert retry.status_code == 409
    assert retry.json()["code"] == "idempotency_response_not_stored"
    assert retry.json()["original_status"] == 502
    assert run() == "No requests abandoned mid-way.\n"


def test_complete_leaves_running_requests_alone():
    abandon("k1")
    IdempotencyKey.objects.filter(key="k1").update(lease_until=Now() + timedelta(seconds=30))

    assert IdempotencyKey.objects.complete_abandoned() == 0
    assert IdempotencyKey.objects.get(key="k1").state == IdempotencyKey.State.IN_PROGRESS


def test_a_completed_abandoned_call_raises_not_stored_for_functions():
    def attempt():
        with idempotent_call("job", scope="jobs", atomic=False) as call:
            call.phase("download", lambda: "file")
            raise ConnectionError("worker lost")

    with pytest.raises(ConnectionError):
        attempt()
    assert IdempotencyKey.objects.abandoned().complete_abandoned(status=500) == 1

    with (
        pytest.raises(IdempotencyResponseNotStored, match="closed by an operator"),
        idempotent_call("job", scope="jobs", atomic=False),
    ):
        pytest.fail("must not run again")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--status", "abc"], "argument --status: must be an HTTP status code"),
        (["--status", "99"], "argument --status: must be an HTTP status code"),
        (["--database", "nope"], "no database 'nope'"),
    ],
)
def test_bad_arguments_are_clear_errors(args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)


def test_complete_abandoned_refuses_a_bad_status():
    with pytest.raises(ValueError, match="status must be an HTTP status code"):
        IdempotencyKey.objects.complete_abandoned(status=True)


def test_the_cache_store_has_no_abandoned_requests(settings):
    settings.IDEMPOTENCY_STORE = "django_idempotency.stores.CacheStore"
    with pytest.raises(CommandError, match="keeps no recovery points"):
        run()


def test_purging_and_releasing_stale_keys_keep_keys_abandoned_mid_way():
    abandon("mid-way")
    died = IdempotencyKeyFactory(key="died-early", in_progress=True)
    IdempotencyKey.objects.filter(pk=died.pk).update(lease_until=Now() - timedelta(minutes=1))

    assert IdempotencyKey.objects.release_stale() == 1
    assert IdempotencyKey.objects.purge(stale_leases=True) == 0
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["mid-way"]

    # Its retry still resumes: one order, not two.
    retry = Client().post(
        "/phased/?note=n", {"amount": 7}, "application/json", headers={"Idempotency-Key": "mid-way"}
    )
    assert retry.json()["resumed_after"] == "order"
    assert Charge.objects.filter(note="n:order").count() == 1


def test_an_expired_abandoned_key_is_purged():
    abandon("mid-way")
    IdempotencyKey.objects.update(expires_at=Now() - timedelta(seconds=1))

    assert IdempotencyKey.objects.purge() == 1


def test_complete_abandoned_leaves_stale_keys_without_phases_unless_asked():
    abandon("mid-way")
    died = IdempotencyKeyFactory(key="died-early", in_progress=True)
    IdempotencyKey.objects.filter(pk=died.pk).update(lease_until=Now() - timedelta(minutes=1))

    assert IdempotencyKey.objects.complete_abandoned() == 1
    assert IdempotencyKey.objects.get(key="died-early").state == IdempotencyKey.State.IN_PROGRESS

    assert "Completed 1 key" in run("--all", "--complete")
    assert IdempotencyKey.objects.get(key="died-early").state == IdempotencyKey.State.COMPLETED
