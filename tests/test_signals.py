"""Signals and log records (issue #7): one per event, on every adapter and both stores."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.test import Client

from django_idempotency import signals
from django_idempotency.conf import get_store
from tests.views import HAS_DRF

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("store")]

BODY = {"amount": 5}
URLS = ["/sync/", "/sync/lease/", "/async/"] + (["/api/", "/apiview/"] if HAS_DRF else [])


@pytest.fixture
def events() -> Iterator[list[tuple[str, dict]]]:
    """Every signal sent during the test, as (event, keyword arguments), in order."""
    seen: list[tuple[str, dict]] = []
    receivers = []
    for event, (signal, _level) in signals.EVENTS.items():

        def receiver(sender, event=event, **kwargs):
            seen.append((event, {"sender": sender, **kwargs}))

        signal.connect(receiver, weak=False)
        receivers.append((signal, receiver))
    yield seen
    for signal, receiver in receivers:
        signal.disconnect(receiver)


def post(url, key="k-1", body=BODY, client=None):
    return (client or Client()).post(
        url, json.dumps(body), content_type="application/json", headers={"Idempotency-Key": key}
    )


def names(events) -> list[str]:
    return [event for event, _ in events]


@pytest.mark.parametrize("url", URLS)
def test_a_first_request_is_claimed_then_stored_and_a_retry_replayed(url, events, store):
    first = post(url)
    replay = post(url)

    assert names(events) == ["key_claimed", "response_stored", "response_replayed"]
    claimed, stored, replayed = (kwargs for _, kwargs in events)
    assert claimed["scope"] == stored["scope"] == replayed["scope"] == "anonymous"
    assert claimed["key"] == stored["key"] == replayed["key"] == "k-1"
    atomic = url in ("/sync/", "/api/", "/apiview/") and store.supports_atomic
    assert claimed["mode"] == ("atomic" if atomic else "lease")
    assert stored["status"] == replayed["status"] == first.status_code == replay.status_code
    assert stored["replayable"] is True
    assert replayed["request"].path == url
    assert claimed["sender"] is type(get_store())


def test_a_different_request_with_the_key_sends_key_mismatch(events):
    post("/sync/")
    events.clear()

    assert post("/sync/", body={"amount": 6}).status_code == 422

    assert names(events) == ["key_mismatch"]


def test_a_key_held_by_a_running_request_sends_key_in_progress(events, store):
    store.plant("k-1", fingerprint=_fingerprint("/sync/lease/"), path="/sync/lease/")

    assert post("/sync/lease/").status_code == 409

    assert names(events) == ["key_in_progress"]


def test_an_expired_key_reused_sends_key_taken_over_as_expired(events, store):
    post("/sync/lease/")
    store.expire("k-1")
    events.clear()

    assert post("/sync/lease/").status_code == 201

    assert names(events) == ["key_taken_over", "key_claimed", "response_stored"]
    assert events[0][1]["reason"] == "expired"


def test_a_dead_requests_passed_lease_taken_over_sends_abandoned(events, store):
    store.plant("k-1", fingerprint=_fingerprint("/sync/lease/"), path="/sync/lease/")
    store.set_lease("k-1", -timedelta(seconds=1))

    assert post("/sync/lease/").status_code == 201

    assert names(events) == ["key_taken_over", "key_claimed", "response_stored"]
    assert events[0][1]["reason"] == "abandoned"


def test_a_streamed_response_is_stored_without_a_body(events):
    assert (
        Client()
        .post(
            "/sync/?behaviour=stream",
            json.dumps(BODY),
            content_type="application/json",
            headers={"Idempotency-Key": "k-1"},
        )
        .status_code
        == 201
    )

    assert names(events) == ["key_claimed", "response_stored"]
    assert events[1][1]["replayable"] is False


@pytest.mark.parametrize("fail_open", [False, True])
def test_an_unreachable_store_sends_store_unavailable(events, settings, store, fail_open):
    store.make_unreachable()
    settings.IDEMPOTENCY_FAIL_OPEN = fail_open

    response = post("/sync/lease/")

    assert response.status_code == (201 if fail_open else 503)
    assert names(events) == ["store_unavailable"]
    assert events[0][1]["fail_open"] is fail_open


def test_a_request_without_a_key_sends_nothing(events):
    assert Client().post("/sync/", BODY, content_type="application/json").status_code == 201

    assert events == []


def test_a_receiver_that_raises_changes_no_answer_and_is_logged(caplog):
    def broken(sender, **kwargs):
        raise ValueError("metrics backend down")

    signals.response_replayed.connect(broken, weak=False)
    try:
        first = post("/sync/")
        with caplog.at_level(logging.ERROR, logger="django_idempotency"):
            replay = post("/sync/")
    finally:
        signals.response_replayed.disconnect(broken)

    assert replay.status_code == first.status_code
    assert replay["Idempotent-Replayed"] == "true"
    assert "response_replayed signal raised" in caplog.text
    assert "metrics backend down" in caplog.text


def test_each_event_is_logged_with_structured_fields_and_no_body(caplog):
    with caplog.at_level(logging.DEBUG, logger="django_idempotency"):
        post("/sync/", body={"amount": 5, "card": "4242-secret"})
        post("/sync/", body={"amount": 5, "card": "4242-secret"})

    records = [record for record in caplog.records if hasattr(record, "idempotency_event")]
    assert [record.idempotency_event for record in records] == [
        "key_claimed",
        "response_stored",
        "response_replayed",
    ]
    assert all(record.idempotency_key == "k-1" for record in records)
    assert all(record.idempotency_scope == "anonymous" for record in records)
    assert records[1].idempotency_status == 201
    assert "4242-secret" not in caplog.text
    assert "response_replayed scope='anonymous' key='k-1' status=201" in caplog.text


def _fingerprint(url: str) -> str:
    from django.test import RequestFactory

    from django_idempotency.core import request_fingerprint

    return request_fingerprint(
        RequestFactory().post(url, json.dumps(BODY), content_type="application/json")
    )
