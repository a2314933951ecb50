"""The admin in a real browser: headless Chromium, driven by Selenium, against a live server.

It logs in, filters the changelist, opens a key with a JSON body and purges expired keys with
the action. Needs Debian's ``chromium`` and ``chromium-driver`` and Selenium from PyPI; without
them it is skipped, with the reason (and fails when ``IDEMPOTENCY_REQUIRE_SERVICES`` is set, as
in CI). Screenshots go to a temporary folder, or to ``ADMIN_SCREENSHOTS_DIR``: the ones in
``docs/img/`` are made with ``ADMIN_SCREENSHOTS_DIR=docs/img pytest tests/test_admin_browser.py``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from importlib.util import find_spec
from pathlib import Path

import django.contrib.admin
import pytest
from django.contrib import admin
from django.db.models.functions import Now
from django.urls import path

from django_idempotency.models import IdempotencyKey
from tests.factories import PASSWORD, IdempotencyKeyFactory, UserFactory

urlpatterns = [path("admin/", admin.site.urls)]

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls(__name__)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ADMIN_STATIC = Path(django.contrib.admin.__file__).parent / "static"
CHANGELIST = "/admin/django_idempotency/idempotencykey/"
ORDER_BODY = (
    b'{"id":2001,"status":"paid","customer":{"id":42,"email":"ada@example.com"},'
    b'"items":[{"sku":"BOOK-1","quantity":2,"price":"12.50"},'
    b'{"sku":"PEN-7","quantity":1,"price":"3.20"}],"total":"28.20","currency":"EUR"}'
)


def _browser_problem() -> str | None:
    if find_spec("selenium") is None:
        return "Selenium is not installed (pip install selenium)"
    for program in (CHROMIUM, CHROMEDRIVER):
        if not program.exists():
            return f"{program} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture
def server(settings):
    """A live server of this module's URLs that also serves the admin's CSS and JavaScript.

    The suite's settings have no ``django.contrib.staticfiles``: the admin's own static
    folder is served under ``/static/``.
    """
    from pytest_django.live_server_helper import LiveServer

    settings.STATIC_URL = "/static/"
    settings.STATIC_ROOT = str(ADMIN_STATIC)
    live = LiveServer("localhost")
    yield live
    live.stop()


@pytest.fixture
def browser():
    if problem := _browser_problem():
        if os.environ.get("IDEMPOTENCY_REQUIRE_SERVICES", "") not in ("", "0"):
            pytest.fail(f"needs a browser, but {problem}", pytrace=False)
        pytest.skip(f"needs a browser: {problem}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


@pytest.fixture
def screenshots(tmp_path):
    folder = Path(os.environ.get("ADMIN_SCREENSHOTS_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)

    def save(driver, name):
        target = folder / f"{name}.png"
        assert driver.save_screenshot(str(target)), target
        return target

    return save


def _keys():
    """A few dozen keys as a shop's API leaves them: orders, payments, refunds; some expired."""
    order = IdempotencyKeyFactory(
        completed=True,
        key="order-2001",
        fingerprint="9f2c4e1ab07d3c58e6f1a2b9c4d7e0f3a6b8c1d4e7f0a3b6c9d2e5f8a1b4c7d0",
        scope="user:42",
        path="/api/orders/",
        response_body=ORDER_BODY,
        response_headers=[
            ["Content-Type", "application/json"],
            ["Location", "/api/orders/2001/"],
            ["ETag", '"order-2001-v1"'],
        ],
    )
    for number in range(12):
        IdempotencyKeyFactory(
            completed=True,
            key=f"pay-{7300 + number}",
            scope=f"user:{40 + number % 4}",
            path=f"/api/orders/{1990 + number}/pay/",
            response_status=402 if number % 5 == 0 else 201,
        )
    IdempotencyKeyFactory(in_progress=True, key="refund-88", scope="user:41", path="/api/refunds/")
    expired = [
        IdempotencyKeyFactory(
            completed=True, key=f"order-{1900 + number}", scope="user:43", path="/api/orders/"
        )
        for number in range(6)
    ]
    keys = IdempotencyKey.objects.all()
    for minutes, key in enumerate(keys.order_by("-pk")):
        keys.filter(pk=key.pk).update(created_at=Now() - timedelta(minutes=7 * minutes + 1))
    keys.filter(pk__in=[key.pk for key in expired]).update(
        created_at=Now() - timedelta(days=2), expires_at=Now() - timedelta(days=1)
    )
    return order, expired


def loads(browser, action) -> None:
    """Run ``action`` (a click or a submit) and wait until the browser has left the page.

    Without the wait, the next lookup can find an element of the page being left, which goes
    stale a moment later, on a busy machine.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = browser.find_element(By.TAG_NAME, "html")
    action()
    WebDriverWait(browser, 30).until(expected_conditions.staleness_of(page))


def test_an_operator_inspects_keys_and_purges_the_expired_ones(server, browser, screenshots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    order, expired = _keys()
    user = UserFactory(username="operator", is_staff=True, is_superuser=True)

    # Log in.
    browser.get(f"{server.url}/admin/login/?next={CHANGELIST}")
    browser.find_element(By.NAME, "username").send_keys(user.username)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    loads(browser, browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click)
    assert browser.find_element(By.ID, "result_list")
    # Fold the admin's navigation away, so the screenshots show every column.
    browser.find_element(By.ID, "toggle-nav-sidebar").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")) == 20
    screenshots(browser, "admin-changelist")

    # Filter: completed keys answered with a 4xx.
    loads(browser, browser.find_element(By.LINK_TEXT, "4xx").click)
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 3
    assert all("402" in row.text for row in rows)
    assert "status=4xx" in browser.current_url

    # Search for one key and open it: its JSON body is pretty-printed, its headers a table.
    browser.get(f"{server.url}{CHANGELIST}")
    search = browser.find_element(By.ID, "searchbar")
    search.send_keys("order-2001")
    loads(browser, search.submit)
    loads(browser, browser.find_element(By.LINK_TEXT, "order-2001").click)
    body = browser.find_element(By.CSS_SELECTOR, ".field-body_display pre").text
    assert '"email": "ada@example.com"' in body
    assert body.startswith('{\n  "id": 2001,')
    headers = browser.find_element(By.CSS_SELECTOR, ".field-headers_table table").text
    assert "Location /api/orders/2001/" in headers
    assert "201 Created" in browser.page_source
    browser.execute_script(
        "document.querySelector('.field-expires_at').scrollIntoView({block: 'start'})"
    )
    screenshots(browser, "admin-detail")

    # Purge: the expired ones are listed by the expiry filter...
    browser.get(f"{server.url}{CHANGELIST}?expiry=expired")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")) == 6
    # ... but the action is safe on any selection: select every key of the page and run it.
    browser.get(f"{server.url}{CHANGELIST}")
    browser.find_element(By.ID, "action-toggle").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("purge_expired")
    loads(browser, browser.find_element(By.CSS_SELECTOR, ".actions button[type=submit]").click)
    messages = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "ul.messagelist li")]
    assert messages == [
        "Deleted 6 expired keys.",
        "Kept 14 selected keys: not expired yet, or in use by a request.",
    ]
    screenshots(browser, "admin-purge")

    assert not IdempotencyKey.objects.filter(pk__in=[key.pk for key in expired]).exists()
    assert IdempotencyKey.objects.filter(pk=order.pk).exists()
    assert IdempotencyKey.objects.count() == 14
