"""Compensations of phases: registered by name, run last phase first, each once, recorded on the
key, by ``run.compensate()`` in code or by ``idempotency_abandoned --compensate``.

The view under test is ``/compensated/`` (``tests/reliability_views.py``): an order undone by
``tests-cancel-order`` (a local write, committed with its record), a provider's charge undone
by ``tests-refund-charge`` (a refund at the provider, with the derived key), a receipt with no
compensation. The compensations (``tests/compensations.py``) write a journal every process can
read. The last test kills a real gunicorn worker after the payment and runs two commands at
once, on PostgreSQL and MariaDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models.functions import Now
from django.test import Client

from django_idempotency import phases
from django_idempotency.exceptions import (
    IdempotencyKeyInProgress,
    IdempotencyLeaseLost,
    IdempotencyResponseNotStored,
    IdempotencyStoreUnavailable,
)
from django_idempotency.functions import idempotent_call
from django_idempotency.lifecycle import Run
from django_idempotency.models import IdempotencyKey
from django_idempotency.phases import compensate_abandoned, compensation, compensation_key
from django_idempotency.records import ClaimRequest
from tests.compensations import journal
from tests.models import Charge
from tests.reliability_support import ROOT, Server, worker_database_url
from tests.reliability_views import provider_ledger

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls("tests.reliability_views")]


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Compensations a test registers are forgotten after it."""
    monkeypatch.setattr(phases, "_COMPENSATIONS", dict(phases._COMPENSATIONS))


@pytest.fixture(autouse=True)
def hold_dir(tmp_path, monkeypatch):
    """The views' hold files, the provider's ledger and the compensations' journal live here."""
    monkeypatch.setenv("RELIABILITY_HOLD_DIR", str(tmp_path))
    return tmp_path


def post(key, *, note="n", fail="", url="/compensated/", query=""):
    headers = {"X-Fail": fail}
    if key is not None:
        headers["Idempotency-Key"] = key
    return Client(raise_request_exception=False).post(
        f"{url}?note={note}{query}", {"amount": 7}, "application/json", headers=headers
    )


def run(*args):
    out = StringIO()
    call_command("idempotency_abandoned", *args, stdout=out, stderr=out)
    return out.getvalue()


def derived(key, phase):
    """The compensation key of ``phase`` for the stored ``key``, as anyone may recompute it."""
    row = IdempotencyKey.objects.get(key=key)
    claim = ClaimRequest(
        scope=row.scope,
        key=row.key,
        fingerprint=row.fingerprint,
        method=row.method,
        path=row.path,
        token="-",
        ttl=timedelta(hours=1),
    )
    return compensation_key(claim, phase)


def points(key):
    return IdempotencyKey.objects.get(key=key).recovery_points


def abandon_after_payment(key, note="n"):
    response = post(key, note=note, fail="after-payment")
    assert response.status_code == 500
    assert [point[0] for point in points(key)] == ["order", "payment"]


# -- Registering -------------------------------------------------------------------------------


def test_a_name_registered_twice_by_another_function_is_refused():
    with pytest.raises(ValueError, match="'tests-cancel-order' is registered already"):

        @compensation("tests-cancel-order")
        def other(result, *, key):
            pass


def test_a_compensation_needs_a_name():
    with pytest.raises(TypeError, match="non-empty string"):
        compensation("")


@pytest.mark.parametrize("name", [123, ["refund-charge"], b"refund-charge", ""])
def test_a_compensation_name_that_is_not_a_string_fails_at_the_phase_naming_it(name):
    # Was a LookupError suggesting @compensation(123), or "unhashable type: 'list'".
    ran = []
    with (
        pytest.raises(TypeError, match=r"The phase 'payment': compensate must be the name of"),
        idempotent_call("k", scope="s", atomic=False) as call,
    ):
        call.phase("payment", lambda: ran.append(1), compensate=name)

    assert ran == []


def test_an_unknown_compensation_fails_at_the_phase_before_it_runs():
    ran = []
    with (
        pytest.raises(LookupError, match=r"No compensation is registered as 'refund-typo'"),
        idempotent_call("k", scope="s", atomic=False) as call,
    ):
        call.phase("payment", lambda: ran.append(1), compensate="refund-typo")

    assert ran == []
    assert not IdempotencyKey.objects.filter(recovery_points__isnull=False).exists()


def test_compensations_of_an_apps_compensations_module_are_found_without_importing_it(
    monkeypatch,
):
    monkeypatch.delitem(sys.modules, "tests.compensations")
    monkeypatch.setattr(phases, "_COMPENSATIONS", {})

    found = phases.get_compensation("tests-refund-charge")

    assert found is sys.modules["tests.compensations"].refund_charge


# -- The command -------------------------------------------------------------------------------


def test_the_command_runs_each_compensation_once_last_phase_first_with_its_derived_key():
    abandon_after_payment("k")
    [charge_key] = provider_ledger()

    output = run("--compensate", "--status", "402")

    refund_key, cancel_key = derived("k", "payment"), derived("k", "order")
    assert journal() == [("refund-charge", refund_key), ("cancel-order", cancel_key)]
    assert "Compensated anonymous 'k' (ran: tests-refund-charge, tests-cancel-order)" in output
    # The keys: one per phase, 64 hex characters, never the phase's own foreign key.
    assert len({refund_key, cancel_key, charge_key}) == 3
    assert len(refund_key) == 64
    assert f"refund-{refund_key}" in provider_ledger()
    order = points("k")[0][1]
    assert Charge.objects.filter(note=f"cancel:{order}").count() == 1
    row = IdempotencyKey.objects.get(key="k")
    assert row.state == IdempotencyKey.State.COMPLETED
    assert row.response_status == 402
    assert [point[2] for point in row.recovery_points] == [
        {"compensation": "tests-cancel-order", "compensated": True},
        {"compensation": "tests-refund-charge", "compensated": True},
    ]

    # A second run finds nothing; a retry gets the documented 409 and never runs again.
    assert run("--compensate") == "No requests abandoned mid-way.\n"
    retry = post("k")
    assert retry.status_code == 409
    assert retry.json()["code"] == "idempotency_response_not_stored"
    assert retry.json()["original_status"] == 402
    assert len(journal()) == 2
    assert Charge.objects.filter(note="n:order").count() == 1
    assert not Charge.objects.filter(note="n:receipt").exists()


def test_a_compensation_that_raises_leaves_the_rest_pending_and_a_rerun_resumes(hold_dir):
    abandon_after_payment("k")
    (hold_dir / "fail-cancel-order").touch()

    with pytest.raises(CommandError, match="1 key could not be compensated") as error:
        run("--compensate")

    assert "CompensationFailed: cancel-order failed" in str(error.value)
    assert journal() == [("refund-charge", derived("k", "payment"))]
    row = IdempotencyKey.objects.annotate(db_now=Now()).get(key="k")
    assert row.state == IdempotencyKey.State.IN_PROGRESS
    assert row.lease_until <= row.db_now  # free for the rerun at once
    assert [len(point[2]) for point in row.recovery_points] == [1, 2]  # payment done
    assert not Charge.objects.filter(note__startswith="cancel:").exists()  # rolled back

    # Meanwhile a retry must not resume the half-undone work: it waits.
    retry = post("k")
    assert retry.status_code == 409
    assert retry.json()["code"] == "idempotency_key_in_progress"
    assert not Charge.objects.filter(note="n:receipt").exists()

    (hold_dir / "fail-cancel-order").unlink()
    assert "Compensated anonymous 'k' (ran: tests-cancel-order)" in run("--compensate")
    assert [name for name, _ in journal()] == ["refund-charge", "cancel-order"]
    assert IdempotencyKey.objects.get(key="k").state == IdempotencyKey.State.COMPLETED


def test_the_command_prints_json_and_filters_by_key():
    abandon_after_payment("k1")
    abandon_after_payment("k2", note="m")

    report = json.loads(run("--compensate", "--json", "--key", "k2"))

    [outcome] = report["compensated"]
    assert outcome == {
        "scope": "anonymous",
        "key": "k2",
        "outcome": "compensated",
        "ran": ["tests-refund-charge", "tests-cancel-order"],
        "pending": [],
        "error": None,
    }
    assert IdempotencyKey.objects.get(key="k1").state == IdempotencyKey.State.IN_PROGRESS


def test_the_command_skips_keys_whose_phases_declare_no_compensation():
    response = post("old", url="/phased/", fail="after-order")
    assert response.status_code == 500

    output = run("--compensate")

    assert "Skipped anonymous 'old': its phases declare no compensation" in output
    assert IdempotencyKey.objects.get(key="old").state == IdempotencyKey.State.IN_PROGRESS


def test_recovery_points_stored_as_pairs_still_load_and_resume():
    abandon_after_payment("k")
    # As a release before compensations stored them: [name, result] pairs.
    stored = [point[:2] for point in points("k")]
    IdempotencyKey.objects.filter(key="k").update(recovery_points=stored)

    assert json.loads(run("--json"))["keys"][0]["phases"] == ["order", "payment"]
    assert "its phases declare no compensation" in run("--compensate")
    retry = post("k")

    assert retry.status_code == 201
    assert retry.json()["resumed_after"] == "payment"
    assert retry.json()["order"] == stored[0][1]
    assert points("k")[:2] == stored
    assert Charge.objects.filter(note="n:order").count() == 1


def test_a_key_taken_by_someone_else_meanwhile_is_skipped(monkeypatch):
    abandon_after_payment("k")
    from django_idempotency.stores import DatabaseStore

    claim = DatabaseStore.claim

    def retry_first(self, request, **kwargs):
        # A retry of the request takes the key just before the command does.
        IdempotencyKey.objects.filter(key="k").update(lease_until=Now() + timedelta(seconds=30))
        return claim(self, request, **kwargs)

    monkeypatch.setattr(DatabaseStore, "claim", retry_first)

    assert "Skipped anonymous 'k': a live request, a retry or another compensation holds it" in run(
        "--compensate"
    )
    assert journal() == []


def test_compensate_abandoned_from_code_refuses_a_bad_status():
    with pytest.raises(ValueError, match="status must be an HTTP status code"):
        compensate_abandoned(status=600)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compensate", "--complete"], "exclude each other"),
        (["--compensate", "--all"], "nothing to compensate"),
        (["--compensate", "--database", "nope"], "no database 'nope'"),
        # An empty alias (an unset variable in a script) was the default database.
        (["--compensate", "--database", ""], "no database ''"),
    ],
)
def test_bad_combinations_are_clear_errors(args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)


def test_the_cache_store_cannot_compensate(settings):
    settings.IDEMPOTENCY_STORE = "django_idempotency.stores.CacheStore"
    with pytest.raises(ImproperlyConfigured, match="phases need the DatabaseStore"):
        compensate_abandoned()


# -- In code -----------------------------------------------------------------------------------


def test_compensate_in_a_view_then_return_a_response_stores_that_response():
    declined = post("k", query="&decline=1")

    assert declined.status_code == 402
    assert declined.json()["compensated"] == ["tests-refund-charge", "tests-cancel-order"]
    assert journal() == [
        ("refund-charge", derived("k", "payment")),
        ("cancel-order", derived("k", "order")),
    ]
    replay = post("k", query="&decline=1")
    assert replay.status_code == 402
    assert replay["Idempotent-Replayed"] == "true"
    assert len(journal()) == 2


def test_compensate_in_a_view_that_then_raises_finishes_the_key_without_a_response():
    assert post("k", fail="compensate-then-raise").status_code == 500

    assert [name for name, _ in journal()] == ["refund-charge", "cancel-order"]
    retry = post("k")
    assert retry.status_code == 409
    assert retry.json()["code"] == "idempotency_response_not_stored"
    assert retry.json()["original_status"] == 500
    assert Charge.objects.filter(note="n:order").count() == 1
    assert len(journal()) == 2


def test_an_async_view_compensates_with_acompensate():
    declined = post("k", url="/compensated/async/")

    assert declined.status_code == 402
    assert [name for name, _ in journal()] == ["refund-charge", "cancel-order"]
    assert journal()[0][1] == derived("k", "payment")


def test_a_block_compensates_and_its_later_calls_get_not_stored():
    undone = []

    @compensation("tests-undo-download")
    def undo(result, *, key):
        undone.append((result, key))

    def attempt():
        with idempotent_call("job", scope="jobs", atomic=False) as call:
            call.phase("download", lambda: "file-1", compensate="tests-undo-download")
            assert call.compensate() == ["tests-undo-download"]
            with pytest.raises(RuntimeError, match="comes after compensate"):
                call.phase("import", lambda: 1)
            assert call.compensate() == []  # nothing left: each compensation runs once
            raise ConnectionError("gave up")

    with pytest.raises(ConnectionError):
        attempt()

    assert [result for result, _ in undone] == ["file-1"]
    with (
        pytest.raises(IdempotencyResponseNotStored),
        idempotent_call("job", scope="jobs", atomic=False),
    ):
        pytest.fail("must not run again")


def test_without_a_claimed_key_compensations_run_with_a_new_key_each_time():
    calls = []

    @compensation("tests-collect")
    def collect(result, *, key):
        calls.append((result, key))

    for _ in range(2):
        # A run without a claimed key (no key sent, or failing open): nothing is recorded.
        unprotected = phases.Phases()
        unprotected.run(
            "p", lambda: 1, atomic=False, compensate="tests-collect", claim=None, store=None
        )
        assert unprotected.compensate(None, None) == ["tests-collect"]

    assert [result for result, _ in calls] == [1, 1]
    assert calls[0][1] != calls[1][1]


def test_compensate_is_refused_in_the_atomic_mode():
    with (
        idempotent_call("k", scope="s", atomic=True) as call,
        pytest.raises(RuntimeError, match="needs the lease mode"),
    ):
        call.compensate()


def test_compensate_after_the_result_is_saved_is_refused():
    with idempotent_call("k", scope="s", atomic=False) as call:
        call.save(1)
        with pytest.raises(RuntimeError, match="after its request or call has finished"):
            call.compensate()


def test_a_replayed_block_has_nothing_to_compensate():
    idempotent_call("k", scope="s", atomic=False).run(lambda: 1)
    with idempotent_call("k", scope="s", atomic=False) as call:
        with pytest.raises(RuntimeError, match="nothing to compensate"):
            call.compensate()
        call.finish()


def half_compensate():
    """A block whose second compensation ran and whose first raised."""

    @compensation("tests-fails")
    def fails(result, *, key):
        raise RuntimeError("provider down")

    @compensation("tests-fine")
    def fine(result, *, key):
        pass

    def attempt():
        with idempotent_call("job", scope="jobs", atomic=False) as call:
            call.phase("one", lambda: 1, compensate="tests-fails")
            call.phase("two", lambda: 2, compensate="tests-fine")
            call.compensate()

    with pytest.raises(RuntimeError, match="provider down"):
        attempt()
    return IdempotencyKey.objects.get(key="job")


@pytest.mark.parametrize("atomic", [False, True], ids=["lease", "atomic"])
def test_a_retry_of_a_half_compensated_call_waits_and_leaves_the_key_as_it_was(atomic):
    before = half_compensate()
    assert before.recovery_points[1][2] == {"compensation": "tests-fine", "compensated": True}

    with (
        pytest.raises(IdempotencyKeyInProgress),
        idempotent_call("job", scope="jobs", atomic=atomic),
    ):
        pytest.fail("must not resume half-undone work")

    after = IdempotencyKey.objects.get(key="job")
    assert after.recovery_points == before.recovery_points
    assert after.state == IdempotencyKey.State.IN_PROGRESS
    assert IdempotencyKey.objects.abandoned().filter(key="job").exists()  # for the command


def test_a_retry_that_cannot_give_a_half_compensated_key_back_still_waits(monkeypatch, caplog):
    half_compensate()
    from django_idempotency.stores import DatabaseStore

    def down(self, claim):
        raise IdempotencyStoreUnavailable()

    monkeypatch.setattr(DatabaseStore, "end_lease", down)

    with (
        pytest.raises(IdempotencyKeyInProgress),
        idempotent_call("job", scope="jobs", atomic=False),
    ):
        pytest.fail("must not resume half-undone work")
    assert "Could not end the lease of idempotency key 'job'" in caplog.text


def test_a_compensated_key_that_cannot_be_finished_is_left_to_its_lease(monkeypatch, caplog):
    from django_idempotency.stores import DatabaseStore

    def down(self, claim, response):
        raise IdempotencyStoreUnavailable()

    monkeypatch.setattr(DatabaseStore, "complete", down)

    assert post("k", fail="compensate-then-raise").status_code == 500

    assert "Could not finish the compensated idempotency key 'k'" in caplog.text
    monkeypatch.undo()
    retry = post("k")
    assert retry.status_code == 409
    assert retry.json()["code"] == "idempotency_key_in_progress"
    assert not Charge.objects.filter(note="n:receipt").exists()


def test_a_compensation_whose_key_was_taken_over_rolls_back():
    @compensation("tests-taken")
    def taken(result, *, key):
        Charge.objects.create(amount=-1, note="undo")
        IdempotencyKey.objects.filter(key="k").update(owner_token=uuid.uuid4().hex)

    def attempt():
        with idempotent_call("k", scope="s", atomic=False) as call:
            call.phase("one", lambda: 1, compensate="tests-taken")
            call.compensate()

    with pytest.raises(IdempotencyLeaseLost, match="taken over"):
        attempt()
    assert not Charge.objects.filter(note="undo").exists()
    assert len(IdempotencyKey.objects.get(key="k").recovery_points[0][2]) == 1


def test_compensate_from_async_code_says_to_await_acompensate():
    async def main():
        with pytest.raises(RuntimeError, match=r"await acompensate\(\)"):
            Run().compensate()

    asyncio.run(main())


def test_registering_the_same_function_again_is_harmless():
    from tests.compensations import cancel_order

    assert compensation("tests-cancel-order")(cancel_order) is cancel_order


def test_the_command_leaves_keys_it_cannot_lock_or_finish(monkeypatch):
    abandon_after_payment("k")
    from django_idempotency.stores import DatabaseStore, KeyLocked

    def locked(self, claim, **kwargs):
        raise KeyLocked()

    with monkeypatch.context() as patch:
        patch.setattr(DatabaseStore, "claim", locked)
        assert (
            "Skipped anonymous 'k': a live request, a retry or another compensation holds it"
            in run("--compensate")
        )
    assert journal() == []

    monkeypatch.setattr(DatabaseStore, "complete", lambda self, claim, response: False)
    with pytest.raises(CommandError, match="the key was taken over before it finished"):
        run("--compensate")
    assert len(journal()) == 2  # its compensations ran, and are recorded: none runs again
    assert run("--compensate", "--scope", "other") == "No requests abandoned mid-way.\n"


def test_the_command_reports_a_store_it_cannot_reach(monkeypatch):
    abandon_after_payment("k")
    from django_idempotency.stores import DatabaseStore

    def down(self, claim, **kwargs):
        raise IdempotencyStoreUnavailable()

    monkeypatch.setattr(DatabaseStore, "claim", down)

    with pytest.raises(CommandError, match="Could not compensate: the store is unavailable"):
        run("--compensate")
    assert journal() == []


def test_a_store_is_moved_to_another_database_only_if_it_can_be():
    from django_idempotency.stores import DatabaseStore

    store = DatabaseStore()
    assert phases._store_on(store, None) is store
    assert phases._store_on(store, store.transaction_alias()) is store
    assert phases._store_on(store, "replica").transaction_alias() == "replica"
    assert store.transaction_alias() == "default"

    class Fixed:
        supports_phases = True

        def transaction_alias(self):
            return "default"

    with pytest.raises(ImproperlyConfigured, match="cannot be pointed at the database 'replica'"):
        phases._store_on(Fixed(), "replica")


# -- Real processes ----------------------------------------------------------------------------

LEASE_SECONDS = 1.0

row_locks = pytest.mark.skipif(
    not connection.features.has_select_for_update,
    reason="needs a database that gunicorn and the commands share, with row locks: "
    "PostgreSQL or MariaDB (SQLite in memory is private to the test process)",
)


def _command(hold_dir) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.reliability_settings",
        "RELIABILITY_DATABASE_URL": worker_database_url(),
        "RELIABILITY_HOLD_DIR": str(hold_dir),
        "RELIABILITY_LOCK_TTL": str(LEASE_SECONDS),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "django", "idempotency_abandoned", "--compensate"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@row_locks
def test_requests_of_a_killed_worker_are_compensated_once_by_two_commands_at_once(tmp_path):
    """Issue 15: a real gunicorn worker is SIGKILLed after its order and payment committed, and
    three more requests stop there by raising; then two ``--compensate`` commands (two
    processes) run at once, each compensation taking half a second so that they overlap.
    Every compensation ran exactly once, last phase first, with its derived key, and every
    key is finished: its retries get the documented 409."""
    server = Server(
        tmp_path,
        RELIABILITY_DATABASE_URL=worker_database_url(),
        RELIABILITY_LOCK_TTL=str(LEASE_SECONDS),
    )
    try:
        note = uuid.uuid4().hex[:12]
        url = f"/compensated/?note={note}"
        killed = f"killed-{uuid.uuid4()}"
        server.hold(note, "after-payment")
        thread = threading.Thread(target=lambda: _swallow(server.post, url, killed), daemon=True)
        thread.start()
        os.kill(server.wait_inside(note), signal.SIGKILL)
        server.release(note)
        thread.join(30)
        failed = [f"failed-{n}-{uuid.uuid4()}" for n in range(3)]
        for key in failed:
            # As server.post() sends it (the same request as its retry's), with X-Fail.
            headers = {"Content-Type": "application/json", "X-Fail": "after-payment"}
            answer = server.request(
                "POST", url, b'{"amount": 7}', **{"Idempotency-Key": key, **headers}
            )
            assert answer.status == 500
        keys = [killed, *failed]
        # The dead worker's lease passes: then its request is abandoned after two phases.
        deadline = time.monotonic() + 10
        while IdempotencyKey.objects.abandoned().filter(key__in=keys).count() < len(keys):
            assert time.monotonic() < deadline, "the killed request never became abandoned"
            time.sleep(0.1)

        (tmp_path / "slow").touch()
        commands = [_command(tmp_path), _command(tmp_path)]
        outputs = [command.communicate(timeout=60)[0].decode() for command in commands]

        assert [command.returncode for command in commands] == [0, 0], outputs
        assert sum(output.count("Compensated ") for output in outputs) == len(keys), outputs
        ran = journal(tmp_path, processes=True)
        for key in keys:
            refund, cancel = derived(key, "payment"), derived(key, "order")
            mine = [entry for entry in ran if entry[1] in (refund, cancel)]
            assert [entry[:2] for entry in mine] == [
                ("refund-charge", refund),
                ("cancel-order", cancel),
            ]
            assert len({entry[2] for entry in mine}) == 1  # one process compensated the key
            assert len(provider_ledger(tmp_path)[f"refund-{refund}"]) == 1
            order = points(key)[0][1]
            assert Charge.objects.filter(note=f"cancel:{order}").count() == 1
            retry = server.post(url, key)
            assert retry.status == 409
            assert json.loads(retry.content)["code"] == "idempotency_response_not_stored"
        assert len(ran) == 2 * len(keys)
        # They did overlap: both compensated keys, or one found a key the other held.
        overlapped = len({entry[2] for entry in ran}) == 2 or any(
            "another compensation holds it" in output for output in outputs
        )
        assert overlapped, outputs
        assert Charge.objects.filter(note=f"{note}:order").count() == len(keys)
        assert not Charge.objects.filter(note=f"{note}:receipt").exists()
    finally:
        server.stop()


def _swallow(send, *args):
    """The killed worker's client: its connection drops, and it never retries."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        send(*args)
