"""``manage.py idempotency_demo``: a narrated tour of django-idempotency over real HTTP.

The command serves the project's own WSGI application from a background thread on a free
local port and talks to it with ``urllib``, so every answer shown comes from the running code:
middleware, authentication, the idempotency layer, the views and the database. It exits with
status 1 when an expectation fails, so CI can run it as a check.
"""

from __future__ import annotations

import json
import logging
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from http import HTTPStatus
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.servers.basehttp import (
    ThreadedWSGIServer,
    WSGIRequestHandler,
    get_internal_wsgi_application,
)
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.test.utils import override_settings
from rest_framework.authtoken.models import Token

from django_idempotency.conf import conf, get_store
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import DatabaseStore

from ...models import CarrierLabel, Order, Payment, Shipment, WebhookEvent

WIDTH = 92
# Headers worth showing in the narration; the rest (security headers, Vary, ...) is noise.
SHOWN_HEADERS = ("Content-Type", "Location", "Retry-After", "Idempotent-Replayed", "ETag")
# Headers a replay may legitimately differ in: set per response by the server, or the mark.
PER_RESPONSE_HEADERS = {"date", "server", "idempotent-replayed"}


# -- A tiny HTTP client and server -----------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    seconds: float

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        return ", ".join(values) if values else None

    @property
    def replayed(self) -> bool:
        return self.header("Idempotent-Replayed") == "true"

    @property
    def data(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def code(self) -> str | None:
        """The ``code`` member of a problem+json (or DRF error) body, if any."""
        data = self.data
        return data.get("code") if isinstance(data, dict) else None

    def comparable_headers(self) -> set[tuple[str, str]]:
        return {
            (name.lower(), value)
            for name, value in self.headers
            if name.lower() not in PER_RESPONSE_HEADERS
        }


@dataclass
class Client:
    base_url: str

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        key: str | None = None,
        body: bytes | None = None,
        if_match: str | None = None,
    ) -> Reply:
        headers = {"Accept": "application/json"}
        if if_match is not None:
            headers["If-Match"] = if_match
        if body is not None:
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Token {token}"
        if key is not None:
            headers[conf.IDEMPOTENCY_HEADER] = key
        request = urllib.request.Request(
            self.base_url + path, data=body, headers=headers, method=method
        )
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, reply_headers, content = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:  # 4xx and 5xx answers arrive as exceptions
            status, reply_headers, content = error.code, error.headers, error.read()
        return Reply(status, list(reply_headers.items()), content, time.monotonic() - started)


class _QuietRequestHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # the narration says what happened; an access log would interleave with it


class _Server(ThreadedWSGIServer):
    # 16 duplicates connect at once; the default backlog (10) would drop some SYNs and delay
    # them by a second, spreading the burst out.
    request_queue_size = 64


@contextmanager
def quiet_client_errors() -> Iterator[None]:
    """Silence Django's log line for each 4xx answer: the narration shows them all.

    Enter it after :func:`serve`: loading the WSGI application runs ``django.setup()``, whose
    logging configuration resets this logger's level.
    """
    logger = logging.getLogger("django.request")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def serve() -> Iterator[str]:
    """Serve the project's WSGI application on a free local port; yield its base URL."""
    server = _Server(("127.0.0.1", 0), _QuietRequestHandler)
    server.set_app(get_internal_wsgi_application())
    thread = threading.Thread(target=server.serve_forever, name="demo-server", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- The demo --------------------------------------------------------------------------------


@dataclass
class DemoUser:
    user: AbstractBaseUser
    password: str
    token: str

    @property
    def name(self) -> str:
        return self.user.get_username()


@dataclass
class Outcome:
    failures: list[str] = field(default_factory=list)
    checks: int = 0


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def _reason(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


class Command(BaseCommand):
    help = (
        "Walk through django-idempotency against this project over real HTTP: a replayed "
        "retry, a reused key, a burst of concurrent duplicate payments, per-user scopes, a "
        "missing key and an async webhook. Exits with status 1 if an expectation fails."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--burst",
            type=int,
            default=16,
            help="How many duplicate payment requests to send at once (default: 16).",
        )
        parser.add_argument(
            "--provider-delay",
            type=float,
            default=0.5,
            help="Seconds the fake payment provider takes to charge a card (default: 0.5).",
        )

    def handle(self, *, burst: int, provider_delay: float, **options: Any) -> None:
        if burst < 2:
            raise CommandError("--burst must be at least 2.")
        if provider_delay < 0:
            raise CommandError("--provider-delay cannot be negative.")
        self._require_migrated()
        self.outcome = Outcome()
        self.run_id = uuid.uuid4().hex[:8]  # fresh keys on every run, so the demo can be rerun
        self.burst = burst
        with override_settings(SHOP_PAYMENT_PROVIDER_DELAY=timedelta(seconds=provider_delay)):
            self._introduce(provider_delay)
            with serve() as base_url, quiet_client_errors():
                self.client = Client(base_url)
                self.say(
                    f"The project's WSGI application now serves {base_url} from a "
                    "background thread; every request below is real HTTP."
                )
                self._steps()
        self._conclude()

    # Narration helpers.

    def say(self, text: str = "") -> None:
        self.stdout.write(textwrap.fill(text, WIDTH, break_on_hyphens=False) if text else "")

    def heading(self, text: str) -> None:
        self.stdout.write("")
        self.stdout.write(self.style.MIGRATE_HEADING(text))
        self.stdout.write(self.style.MIGRATE_HEADING("-" * len(text)))

    def show_request(
        self,
        method: str,
        path: str,
        *,
        who: DemoUser | None,
        key: str | None,
        body: bytes | None = None,
        note: str = "",
        if_match: str | None = None,
    ) -> None:
        self.stdout.write(self.style.HTTP_INFO(f"  -> {method} {path}{note}"))
        if who is not None:
            self.stdout.write(f"     Authorization: Token {who.token[:8]}... ({who.name})")
        if key is not None:
            self.stdout.write(f"     {conf.IDEMPOTENCY_HEADER}: {key}")
        if if_match is not None:
            self.stdout.write(f"     If-Match: {if_match}")
        if body is not None:
            self.stdout.write(f"     {body.decode()}")

    def show_reply(self, reply: Reply) -> None:
        self.stdout.write(
            self._status_style(reply.status)(f"  <- {_reason(reply.status)}")
            + f"   ({reply.seconds:.2f} s)"
        )
        for name in SHOWN_HEADERS:
            if (value := reply.header(name)) is not None:
                self.stdout.write(f"     {name}: {value}")
        text = reply.body.decode(errors="replace")
        if len(text) > 600:
            text = text[:600] + f"... ({len(reply.body)} bytes)"
        self.stdout.write(f"     {text}")

    def _status_style(self, status: int) -> Any:
        """Green for 2xx, yellow for 4xx, red for 5xx; plain when stdout is not a terminal."""
        if status >= 500:
            return self.style.ERROR
        if status >= 400:
            return self.style.WARNING
        return self.style.SUCCESS

    def call(
        self,
        method: str,
        path: str,
        *,
        who: DemoUser | None,
        key: str | None,
        body: bytes | None = None,
        if_match: str | None = None,
    ) -> Reply:
        self.show_request(method, path, who=who, key=key, body=body, if_match=if_match)
        token = None if who is None else who.token
        reply = self.client.request(
            method, path, token=token, key=key, body=body, if_match=if_match
        )
        self.show_reply(reply)
        return reply

    def expect(self, condition: bool, description: str) -> bool:
        self.outcome.checks += 1
        if condition:
            self.stdout.write(self.style.SUCCESS(f"  ok: {description}"))
        else:
            self.outcome.failures.append(description)
            self.stdout.write(self.style.ERROR(f"  FAILED: {description}"))
        return condition

    def require(self, condition: bool, description: str) -> None:
        """An expectation the following steps depend on: stop the demo if it fails."""
        if not self.expect(condition, description):
            raise CommandError(f"Stopping the demo: expected that {description}.")

    # Set-up.

    def _require_migrated(self) -> None:
        connection = connections[DEFAULT_DB_ALIAS]
        executor = MigrationExecutor(connection)
        if executor.migration_plan(executor.loader.graph.leaf_nodes()):
            raise CommandError(
                "The database has unapplied migrations: run "
                "'python testproject/manage.py migrate' first."
            )

    def _demo_user(self, username: str, password: str, *, admin: bool) -> DemoUser:
        user, created = get_user_model().objects.get_or_create(
            username=username, defaults={"email": f"{username}@example.com"}
        )
        if created or not user.check_password(password) or user.is_superuser != admin:
            user.set_password(password)
            user.is_staff = user.is_superuser = admin
            user.save()
        token, _ = Token.objects.get_or_create(user=user)
        return DemoUser(user, password, token.key)

    def _introduce(self, provider_delay: float) -> None:
        database = settings.DATABASES[DEFAULT_DB_ALIAS]
        connection = connections[DEFAULT_DB_ALIAS]
        where = database["NAME"]
        if database.get("HOST"):
            where = f"{database['NAME']} on {database['HOST']}:{database.get('PORT') or '-'}"
        title = "django-idempotency demo"
        self.stdout.write(self.style.MIGRATE_HEADING(title))
        self.stdout.write(self.style.MIGRATE_HEADING("=" * len(title)))
        self.stdout.write(f"Database: {connection.display_name} ({where})")
        self.stdout.write(f"Store:    {conf.IDEMPOTENCY_STORE}")
        if not connection.features.has_select_for_update:
            self.say(
                "SQLite has no row locks: concurrent requests take turns on its database-wide "
                "write lock, and the IMMEDIATE transaction mode in settings.py makes them "
                "queue for it instead of failing."
            )
        self.alice = self._demo_user("alice", "alice-demo-password", admin=True)
        self.bob = self._demo_user("bob", "bob-demo-password", admin=False)
        self.say(
            f"The fake payment provider takes {provider_delay:g} s per charge. Demo users "
            "(API clients may use the password with Basic auth, or the token):"
        )
        for user in (self.alice, self.bob):
            role = "  (superuser: log in at /admin/)" if user is self.alice else ""
            self.stdout.write(
                f"  {user.name:6} password {user.password:20} token {user.token}{role}"
            )
        self.say(f"This run's keys carry the run id {self.run_id}.")

    # The steps.

    def _steps(self) -> None:
        alice, bob = self.alice, self.bob
        order_key = f"demo-{self.run_id}-order"
        order_body = _json({"amount": "25.00", "currency": "EUR"})

        self.heading("1. A first POST with an Idempotency-Key creates an order")
        self.say(
            "Alice's app creates an order. It sends a fresh Idempotency-Key with the request "
            "and will send the same key again if it has to retry."
        )
        orders_before = Order.objects.filter(customer=alice.user).count()
        first = self.call("POST", "/api/orders/", who=alice, key=order_key, body=order_body)
        self.require(first.status == 201, "the order is created (201)")
        self.expect(not first.replayed, "the first answer is not marked as a replay")
        order_id = first.data["id"]
        self.expect(
            Order.objects.filter(customer=alice.user).count() == orders_before + 1,
            "Alice has one more order in the database",
        )

        self.heading("2. The retry is answered from the store, byte for byte")
        self.say(
            "The answer never reached the phone (a tunnel, a timeout), so the app retries: the "
            "same key, the same body. The view does not run again; the stored answer comes "
            "back with Idempotent-Replayed: true."
        )
        retry = self.call("POST", "/api/orders/", who=alice, key=order_key, body=order_body)
        self.expect(retry.status == first.status, f"the same status ({first.status})")
        self.expect(
            retry.body == first.body, f"the same body, byte for byte ({len(first.body)} bytes)"
        )
        changed = sorted(retry.comparable_headers() ^ first.comparable_headers())
        self.expect(
            not changed,
            "the same headers (Content-Type, Location, ...), apart from Date and Server"
            + (f"; differing: {changed}" if changed else ""),
        )
        self.expect(retry.replayed, "the retry is marked Idempotent-Replayed: true")
        self.expect(
            Order.objects.filter(customer=alice.user).count() == orders_before + 1,
            "still only one new order",
        )

        self.heading("3. The same key with a different body is refused")
        self.say(
            "A buggy client reuses the key for another order (99.00 instead of 25.00). The "
            "key already stands for a different request, so the answer is 422 "
            "problem+json, and nothing runs or changes."
        )
        changed_body = _json({"amount": "99.00", "currency": "EUR"})
        mismatch = self.call("POST", "/api/orders/", who=alice, key=order_key, body=changed_body)
        self.expect(mismatch.status == 422, "422, refused")
        self.expect(
            mismatch.header("Content-Type") == "application/problem+json",
            "an RFC 9457 problem+json body",
        )
        self.expect(mismatch.code == "idempotency_key_mismatch", "code idempotency_key_mismatch")
        self.expect(
            Order.objects.filter(customer=alice.user).count() == orders_before + 1,
            "no order was created",
        )

        payment = self._burst(order_id)

        self.heading("5. The same key from another user is a different key")
        self.say(
            f"Bob's app happens to generate the very key Alice used in step 1 ({order_key}) "
            "and sends the same body. Keys are scoped per user, so Bob's request runs on its "
            "own: he gets a new order of his own, never Alice's stored answer."
        )
        bobs = self.call("POST", "/api/orders/", who=bob, key=order_key, body=order_body)
        self.require(bobs.status == 201, "Bob's order is created (201)")
        self.expect(not bobs.replayed, "it is not a replay")
        bob_order_id = bobs.data["id"]
        self.expect(
            bob_order_id != order_id and bobs.data["customer"] == "bob",
            f"a new order (#{bob_order_id}) that belongs to Bob",
        )

        self.heading("6. A missing key on the payment endpoint is refused")
        self.say(
            "The payment endpoint is declared @idempotent(required=True). Bob's app forgets "
            "the header when paying for his order: 400 problem+json, and nothing is charged."
        )
        missing = self.call(
            "POST", f"/api/orders/{bob_order_id}/pay/", who=bob, key=None, body=_json({})
        )
        self.expect(missing.status == 400, "400 Bad Request")
        self.expect(missing.code == "idempotency_key_missing", "code idempotency_key_missing")
        self.expect(
            not Payment.objects.filter(order_id=bob_order_id).exists()
            and Order.objects.get(pk=bob_order_id).status == Order.Status.PENDING,
            "no payment was recorded and the order is still pending",
        )

        self._conditional_update(bob_order_id)
        self._shipping(order_id)
        self._webhook(payment)
        self._key_table()

    def _shipping(self, order_id: int) -> None:
        alice = self.alice
        path = f"/api/orders/{order_id}/ship/"
        self.heading("8. Shipping in phases; a shipment that cannot go is undone")
        if not getattr(get_store(), "supports_phases", False):
            self.say(
                f"Skipped: phases keep their recovery points in the DatabaseStore, and "
                f"this run uses {conf.IDEMPOTENCY_STORE}."
            )
            return
        self.say(
            "Shipping runs in phases (lease mode): buy the carrier's label, then book the "
            "shipment, each committed with a recovery point and each with a compensation. "
            "Alice first asks for a same-day shipment. The carrier has no same-day courier, so "
            "the view calls run.compensate(): the shipment is cancelled and the label voided, "
            "and the 409 it answers is stored like any other answer."
        )
        same_day = _json({"service": "same-day"})
        key = f"demo-{self.run_id}-ship-same-day"
        refused = self.call("POST", path, who=alice, key=key, body=same_day)
        self.expect(refused.status == 409, "409: no same-day courier")
        shipment = Shipment.objects.filter(order_id=order_id, service="same-day").last()
        self.expect(
            shipment is not None and shipment.status == Shipment.Status.CANCELLED,
            "its shipment was booked, then cancelled",
        )
        self.expect(
            shipment is not None
            and CarrierLabel.objects.filter(label=shipment.label, voided=True).exists(),
            "its label was bought, then voided at the carrier",
        )
        again = self.call("POST", path, who=alice, key=key, body=same_day)
        self.expect(again.status == 409 and again.replayed, "the retry is the stored 409")
        self.say("She ships it the standard way instead, with a new key.")
        key = f"demo-{self.run_id}-ship-standard"
        shipped = self.call("POST", path, who=alice, key=key, body=_json({"service": "standard"}))
        self.expect(shipped.status == 201, "201: shipped")
        self.expect(
            Shipment.objects.filter(order_id=order_id, status=Shipment.Status.BOOKED).count() == 1,
            "one booked shipment for the order",
        )

    def _conditional_update(self, order_id: int) -> None:
        bob = self.bob
        path = f"/api/orders/{order_id}/"
        self.heading("7. Two edits of one order: the one made from a stale copy is refused")
        self.say(
            "Bob opens his order on his phone and on his laptop. Each answer carries the "
            "order's ETag, its version. He changes the amount on the phone, then, on the "
            "laptop, which still shows the old version, changes it again. Both PATCHes send "
            "If-Match with the ETag they read: the laptop's names a version that is gone, so "
            "it is answered 412 and nothing is overwritten (ConditionalUpdateMixin)."
        )
        read = self.call("GET", path, who=bob, key=None)
        etag = read.header("ETag")
        self.require(read.status == 200 and etag is not None, "the order is read with its ETag")
        phone = self.call(
            "PATCH", path, who=bob, key=None, body=_json({"amount": "30.00"}), if_match=etag
        )
        self.expect(phone.status == 200, "the phone's change is written (200)")
        self.expect(
            phone.header("ETag") not in (None, etag), f"with a new ETag ({phone.header('ETag')})"
        )
        laptop = self.call(
            "PATCH", path, who=bob, key=None, body=_json({"amount": "35.00"}), if_match=etag
        )
        self.expect(laptop.status == 412, "the laptop's stale change is refused (412)")
        self.expect(laptop.code == "precondition_failed", "code precondition_failed")
        self.expect(
            str(Order.objects.get(pk=order_id).amount) == "30.00",
            "the order holds the phone's amount: nothing was overwritten",
        )

    def _burst(self, order_id: int) -> dict[str, Any]:
        alice = self.alice
        pay_key = f"demo-{self.run_id}-pay"
        path = f"/api/orders/{order_id}/pay/"
        body = _json({"source": "tok_visa"})
        self.heading(f"4. {self.burst} concurrent duplicates of one payment: one charge")
        self.say(
            f"Alice pays for order #{order_id}. Her app, on a flaky network, fires "
            f"{self.burst} copies of the same payment at once: one key, one body, "
            f"{self.burst} threads released together. The view charges the card (slowly) "
            "every time it runs."
        )
        self.show_request(
            "POST", path, who=alice, key=pay_key, body=body, note=f"   x {self.burst}, concurrently"
        )
        replies: list[Reply | None] = [None] * self.burst
        barrier = threading.Barrier(self.burst)

        def send(index: int) -> None:
            barrier.wait()
            replies[index] = self.client.request(
                "POST", path, token=alice.token, key=pay_key, body=body
            )

        threads = [threading.Thread(target=send, args=(index,)) for index in range(self.burst)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        answers = [reply for reply in replies if reply is not None]

        def kind(reply: Reply) -> str:
            label = _reason(reply.status)
            if reply.replayed:
                return f"{label}, replayed"
            if reply.status == 201:
                return f"{label}, ran the payment"
            if reply.code:
                label += f", {reply.code}"
            if retry_after := reply.header("Retry-After"):
                label += f", Retry-After: {retry_after}"
            return label

        self.stdout.write(f"  <- {len(answers)} answers in {elapsed:.2f} s:")
        for label, count in sorted(Counter(map(kind, answers)).items()):
            self.stdout.write(f"     {count:3} x {label}")
        if connections[DEFAULT_DB_ALIAS].features.has_select_for_update:
            self.say(
                "The duplicates found the key's row locked by the running payment and were "
                "answered 409 at once (duplicates arriving after it finished get the replay)."
            )
        else:
            self.say(
                "On SQLite the duplicates queued for the database write lock behind the "
                "running payment, then found its stored answer and replayed it."
            )

        fresh = [reply for reply in answers if reply.status == 201 and not reply.replayed]
        replayed = [reply for reply in answers if reply.replayed]
        in_progress = [
            reply
            for reply in answers
            if reply.status == 409
            and reply.code == "idempotency_key_in_progress"
            and reply.header("Retry-After")
        ]
        payments = Payment.objects.filter(order_id=order_id)
        self.expect(len(answers) == self.burst, f"all {self.burst} requests were answered")
        self.require(len(fresh) == 1, "exactly one request ran the payment")
        self.expect(
            len(fresh) + len(replayed) + len(in_progress) == len(answers),
            "every other one is a replay or a 409 in progress with Retry-After",
        )
        self.expect(
            all(reply.body == fresh[0].body for reply in replayed),
            "every replay carries the first answer's body",
        )
        self.expect(payments.count() == 1, f"one Payment row for order #{order_id}, not more")
        self.expect(Order.objects.get(pk=order_id).status == Order.Status.PAID, "order paid")

        self.say(
            "One more retry, as a client told 409 sends it after waiting as Retry-After says. "
            "The payment has finished by now, so the answer is the stored one: the same "
            "charge, not a new one."
        )
        late = self.call("POST", path, who=alice, key=pay_key, body=body)
        self.expect(late.status == 201 and late.replayed, "201, replayed")
        self.expect(late.body == fresh[0].body, "the same payment as the one that ran")
        self.expect(payments.count() == 1, "still one Payment row")
        data: dict[str, Any] = fresh[0].data
        return data

    def _webhook(self, payment: dict[str, Any]) -> None:
        event_id = f"evt_{self.run_id}"
        event = {
            "id": event_id,
            "type": "payment.succeeded",
            "data": {"reference": payment["reference"], "amount": payment["amount"]},
        }
        body = _json(event)
        self.heading("9. An async webhook, delivered twice, is recorded once")
        self.say(
            "The payment provider reports the charge to /api/webhooks/, a plain async Django "
            "view under @idempotent, which runs in the lease mode: the key is claimed in a "
            "short transaction, the view runs outside one, its answer is stored in another. "
            "The provider sends the event id as the key and, having missed the first answer, "
            "delivers the event again."
        )
        first = self.call("POST", "/api/webhooks/", who=None, key=event_id, body=body)
        self.expect(first.status == 202 and not first.replayed, "202 Accepted, recorded")
        again = self.call("POST", "/api/webhooks/", who=None, key=event_id, body=body)
        self.expect(
            again.status == 202 and again.replayed and again.body == first.body,
            "the redelivery is answered with the stored 202, replayed",
        )
        self.expect(
            WebhookEvent.objects.filter(event_id=event_id).count() == 1,
            "one WebhookEvent row for the event",
        )

    def _key_table(self) -> None:
        usernames = {f"user:{demo.user.pk}": demo.name for demo in (self.alice, self.bob)}
        if isinstance(get_store(), DatabaseStore):
            self.heading("10. What the IdempotencyKey table holds")
            self.say(
                "One row per (scope, key) that ran. The refused requests (the 422, the 400, the "
                "412) and the duplicates stored nothing. Alice's and Bob's rows share a key but "
                "not a scope."
            )
            rows = [
                (
                    f"{row.scope} ({usernames[row.scope]})"
                    if row.scope in usernames
                    else row.scope,
                    row.key,
                    row.method,
                    row.path,
                    row.state,
                    "-" if row.response_status is None else str(row.response_status),
                )
                for row in IdempotencyKey.objects.filter(key__contains=self.run_id).order_by(
                    "created_at", "pk"
                )
            ]
            header = ("scope", "key", "method", "path", "state", "status")
        else:
            self.heading(f"10. What the store ({conf.IDEMPOTENCY_STORE}) holds")
            self.say(
                "One record per (scope, key) that ran, looked up through the store for every "
                "scope and key this run used. The refused requests and the duplicates stored "
                "nothing. Alice's and Bob's records share a key but not a scope."
            )
            rows = []
            for scope in [*usernames, "anonymous"]:
                for key in (f"demo-{self.run_id}-order", f"demo-{self.run_id}-pay"):
                    rows.extend(self._store_row(scope, key, usernames))
                rows.extend(self._store_row(scope, f"evt_{self.run_id}", usernames))
            header = ("scope", "key", "state", "status")
            rows = [(row[0], row[1], row[4], row[5]) for row in rows]
        widths = [
            max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)
        ]
        for line in [header, tuple("-" * width for width in widths), *rows]:
            cells = "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            self.stdout.write(f"  {cells}".rstrip())
        if isinstance(get_store(), DatabaseStore):  # the shipments ran (phases need it)
            count, keys = 6, "six keys: Alice's order, payment and two shipments, Bob's order"
        else:
            count, keys = 4, "four keys: Alice's order and payment, Bob's order"
        self.expect(len(rows) == count, f"{keys}, the event")
        completed = IdempotencyKey.State.COMPLETED
        self.expect(all(row[len(header) - 2] == completed for row in rows), "all completed")

    def _store_row(
        self, scope: str, key: str, usernames: dict[str, str]
    ) -> list[tuple[str, str, str, str, str, str]]:
        record = get_store().get(scope=scope, key=key)
        if record is None:
            return []
        status = "-" if record.response is None else str(record.response.status)
        label = f"{scope} ({usernames[scope]})" if scope in usernames else scope
        return [(label, key, "", "", record.state, status)]

    def _conclude(self) -> None:
        self.stdout.write("")
        failures = self.outcome.failures
        if failures:
            raise CommandError(
                f"{len(failures)} of {self.outcome.checks} expectations failed: "
                + "; ".join(failures)
            )
        self.stdout.write(self.style.SUCCESS(f"All {self.outcome.checks} expectations held."))
        self.say(
            "Explore further: python testproject/manage.py runserver, then see "
            "testproject/README.md for curl examples, or log in to /admin/ as alice."
        )
