"""Isolation and secrets: keys never cross callers; cookies, credentials and bodies never leak.

docs/contract.md, "Scope": keys live in a scope, and one caller never receives a response
another produced; ``Set-Cookie`` is never stored; and (issue #6) ``Authorization`` is never
stored and logs never carry a stored body. The same key is sent by anonymous and authenticated
callers in two tenants (a custom ``IDEMPOTENCY_SCOPE``), with each store. That the admin shows
stored bodies only with the view permission is proved by ``tests/test_admin.py``
(``test_stored_responses_are_shown_with_the_view_permission``,
``test_stored_responses_are_hidden_without_the_view_permission``).
"""

from __future__ import annotations

import json
import logging

import pytest
from django.test import Client

from django_idempotency.core import user_scope
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

SECRET_AMOUNT = 987_654_321  # in the request body and in the stored response body


def tenant_and_user_scope(request) -> str:
    """An ``IDEMPOTENCY_SCOPE``: the tenant named by ``X-Tenant``, then the caller."""
    return f"tenant:{request.headers.get('X-Tenant', '')}:{user_scope(request)}"


def _post(client: Client, url: str, key: str, amount: int = 1, **headers: str):
    return client.post(
        url,
        {"amount": amount},
        content_type="application/json",
        headers={"Idempotency-Key": key, **headers},
    )


@pytest.mark.parametrize("url", ["/sync/", "/sync/lease/", "/async/"])
def test_one_key_from_tenants_users_and_anonymous_callers_never_crosses(store, settings, url):
    settings.IDEMPOTENCY_SCOPE = "tests.test_isolation.tenant_and_user_scope"
    users = [None, UserFactory(username="alice"), UserFactory(username="bob")]
    callers = [(tenant, user) for tenant in ("acme", "ACME") for user in users]
    key = "shared-key"
    first = {}
    for index, (tenant, user) in enumerate(callers):
        client = Client()
        if user is not None:
            client.force_login(user)
        first[index] = _post(client, url, key, amount=index + 1, **{"X-Tenant": tenant})

    for index, response in first.items():
        assert response.status_code == 201, response.content
        assert "Idempotent-Replayed" not in response
        assert json.loads(response.content)["amount"] == index + 1
    assert len({response.content for response in first.values()}) == len(callers)
    assert store.count() == len(callers)
    # Each caller's retry gets its own response back, and only its own.
    for index, (tenant, user) in enumerate(callers):
        client = Client()
        if user is not None:
            client.force_login(user)
        replay = _post(client, url, key, amount=index + 1, **{"X-Tenant": tenant})
        assert replay["Idempotent-Replayed"] == "true"
        assert replay.content == first[index].content


def test_set_cookie_and_authorization_are_never_stored_nor_replayed(store, alice, basic_auth):
    credentials = basic_auth(alice)
    client = Client()
    client.force_login(alice)

    first = _post(client, "/sync/", "secret-key", amount=5, **credentials)

    assert first.status_code == 201
    assert "session_hint" in first.cookies  # the view set a cookie
    stored = store.get("secret-key", scope=user_scope_of(alice))
    assert stored is not None
    names = {name.lower() for name, _ in stored.headers}
    assert "set-cookie" not in names
    assert "authorization" not in names
    raw = repr(store.snapshot())
    token = credentials["Authorization"].split()[1]
    for secret in ("first-caller", "session_hint", token, "Authorization"):
        assert secret not in raw, f"{secret!r} was stored"

    replay = _post(Client(), "/sync/", "secret-key", amount=5, **credentials)
    # Anonymous (no session): another scope, so a run of its own, not alice's response.
    assert "Idempotent-Replayed" not in replay
    client.cookies.clear()
    client.force_login(alice)
    replay = _post(client, "/sync/", "secret-key", amount=5, **credentials)
    assert replay["Idempotent-Replayed"] == "true"
    assert "session_hint" not in replay.cookies


def user_scope_of(user) -> str:
    return f"user:{user.pk}"


@pytest.mark.parametrize("url", ["/sync/", "/sync/lease/"])
def test_logs_never_contain_request_or_stored_bodies(store, caplog, url, settings):
    caplog.set_level(logging.DEBUG)
    client = Client(raise_request_exception=False)
    key = "logged-key"

    first = _post(client, url, key, amount=SECRET_AMOUNT)
    replay = _post(client, url, key, amount=SECRET_AMOUNT)
    mismatch = _post(client, url, key, amount=SECRET_AMOUNT + 1)
    failed = _post(client, f"{url}?behaviour=raise", "other-key", amount=SECRET_AMOUNT)
    settings.IDEMPOTENCY_FAIL_OPEN = True
    store.make_unreachable()
    unprotected = _post(client, url, "third-key", amount=SECRET_AMOUNT)

    assert [first.status_code, replay.status_code, mismatch.status_code] == [201, 201, 422]
    assert failed.status_code == 500
    assert unprotected.status_code in (201, 503)
    assert caplog.records, "nothing was logged: the test proves nothing"
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        assert str(SECRET_AMOUNT) not in text, f"a body reached the logs: {text[:500]}"
