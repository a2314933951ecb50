"""The behaviour experiments behind docs/comparison.md: one small Django project, one package.

Run from this folder, with the Python of a virtualenv where the package is installed (the
load benchmark makes one per package under benchmarks/.work/peers/; ``ours`` runs in .venv):

    cd benchmarks/peers
    PEER=drf-idempotency ../.work/peers/drf-idempotency/bin/python experiments.py
    PEER=drf-idempotency STORE_DOWN=1 ../.work/peers/drf-idempotency/bin/python experiments.py
    PEER=ours ../../.venv/bin/python experiments.py

It needs PostgreSQL on 127.0.0.1:5432 (user postgres) and Redis on 127.0.0.1:6379 (database
13), and prints one line per scenario.
"""

# Django is configured in this file before the imports that need it.
# ruff: noqa: E402

import json
import os
import sys
import threading
import time
import uuid

import django
from django.conf import settings

PEER = os.environ["PEER"]
STORE_DOWN = os.environ.get("STORE_DOWN") == "1"
DBNAME = "cmpexp_" + PEER.replace("-", "_")
PREFIX = f"cmpexp-{PEER}-{time.time()}"
REDIS = "redis://127.0.0.1:1/0" if STORE_DOWN else "redis://127.0.0.1:6379/13"
PGPORT = 1 if STORE_DOWN else 5432

MIDDLEWARE = []
APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "rest_framework",
]
extra = {}
if PEER == "ours":
    APPS.append("django_idempotency")
    extra["IDEMPOTENCY_LEASE"] = __import__("datetime").timedelta(seconds=1)
elif PEER == "django-idempotency-key":
    MIDDLEWARE.append("idempotency_key.middleware.ExemptIdempotencyKeyMiddleware")
    extra["IDEMPOTENCY_KEY"] = {
        "STORAGE": {"CLASS": "idempotency_key.storage.CacheKeyStorage", "CACHE_NAME": "default"},
        "LOCK": {
            "CLASS": "idempotency_key.locks.redis.MultiProcessRedisLock",
            "LOCATION": REDIS,
            "NAME": PREFIX + "-lock",
        },
        "CONFLICT_STATUS_CODE": None,
    }
elif PEER == "djangorestframework-idempotency-key":
    APPS.append("rest_framework_idempotency_key")
    MIDDLEWARE.append("rest_framework_idempotency_key.middleware.IdempotencyKeyMiddleware")
    extra["IDEMPOTENCY_KEY_LOCK_TIMEOUT"] = 1
elif PEER == "drf-idem":
    APPS.append("drf_idem")
    MIDDLEWARE.append("drf_idem.middleware.IdempotencyMiddleware")
    extra["DRF_IDEM"] = {
        "HEADER": "HTTP_IDEMPOTENCY_KEY",
        "CACHE_BACKEND": "default",
        "ENDPOINTS": ["POST /orders/", "POST /flaky/"],
    }
elif PEER == "drf-idempotency":
    APPS.append("drf_idempotency")
    MIDDLEWARE.append("drf_idempotency.middleware.IdempotencyMiddleware")
    extra["IDEMPOTENCY"] = {"LOCK_TTL_SECONDS": 1}
elif PEER == "drf-idempotencykey":
    APPS.append("drf_idempotencykey")
    extra["IDEMPOTENCY_KEY_EXPIRATION_MINUTES"] = 1 / 60  # one second
else:
    raise SystemExit(PEER)

settings.configure(
    DEBUG=False,
    SECRET_KEY="x",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=APPS,
    MIDDLEWARE=MIDDLEWARE,
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": DBNAME,
            "USER": "postgres",
            "HOST": "127.0.0.1",
            "PORT": PGPORT,
            "OPTIONS": {"connect_timeout": 2},
        }
    },
    CACHES={
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS,
            "KEY_PREFIX": PREFIX,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
        }
    },
    REST_FRAMEWORK={
        "DEFAULT_AUTHENTICATION_CLASSES": ["cmpauth.NameAuthentication"],
        "DEFAULT_PERMISSION_CLASSES": [],
        "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
        "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
        "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    },
    USE_TZ=True,
    LOGGING_CONFIG=None,
    **extra,
)

import logging

logging.disable(logging.CRITICAL)

# One-off database for this package.
if not STORE_DOWN:
    import psycopg

    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DBNAME}")
        c.execute(f"CREATE DATABASE {DBNAME}")

django.setup()

from django.urls import path
from rest_framework.decorators import api_view
from rest_framework.response import Response
from rest_framework.views import APIView

RUNS = {}
RUNS_LOCK = threading.Lock()


def count(tag):
    with RUNS_LOCK:
        RUNS[tag] = RUNS.get(tag, 0) + 1
        return RUNS[tag]


def _orders(request):
    data = request.data
    n = count("orders")
    time.sleep(float(data.get("sleep", 0)))
    user = getattr(request.user, "username", "") or "anonymous"
    response = Response(
        {"order": n, "made_for": user, "amount": data.get("amount")},
        status=201,
        headers={"Location": f"/orders/{n}"},
    )
    response.set_cookie("sessionid", f"secret-of-{user}")
    return response


def _flaky(request):
    n = count("flaky")
    if n == 1:
        return Response({"error": "upstream down"}, status=503)
    return Response({"flaky": n}, status=201)


if PEER == "ours":
    from django_idempotency.decorators import idempotent

    orders = api_view(["POST"])(idempotent(_orders))
    orders_lease = api_view(["POST"])(idempotent(atomic=False)(_orders))
    orders_required = api_view(["POST"])(idempotent(required=True)(_orders))
    flaky = api_view(["POST"])(idempotent(_flaky))
elif PEER == "django-idempotency-key":
    from idempotency_key.decorators import idempotency_key

    orders = idempotency_key(api_view(["POST"])(_orders))
    orders_lease = orders
    orders_required = orders  # @idempotency_key without optional=True requires the key
    flaky = idempotency_key(api_view(["POST"])(_flaky))
elif PEER == "djangorestframework-idempotency-key":
    from rest_framework_idempotency_key.decorators import simple_idempotency_key_method

    def cbv(fn):
        class View(APIView):
            @simple_idempotency_key_method
            def post(self, request):
                return fn(request)

        return View.as_view()

    orders = orders_lease = orders_required = cbv(_orders)
    flaky = cbv(_flaky)
elif PEER in ("drf-idem", "drf-idempotency"):
    orders = orders_lease = orders_required = api_view(["POST"])(_orders)
    flaky = api_view(["POST"])(_flaky)
elif PEER == "drf-idempotencykey":
    from drf_idempotencykey.mixins import DrfIdempotencyKeyMixin

    def cbv(fn, required=False):
        class View(DrfIdempotencyKeyMixin, APIView):
            require_idempotency_key = required

            def post(self, request):
                return fn(request)

        return View.as_view()

    orders = orders_lease = cbv(_orders)
    orders_required = cbv(_orders, required=True)
    flaky = cbv(_flaky)

urlpatterns = [
    path("orders/", orders),
    path("lease/orders/", orders_lease),
    path("required/orders/", orders_required),
    path("flaky/", flaky),
]

from django.core.management import call_command
from django.db import connections
from django.test import Client

if not STORE_DOWN:
    call_command("migrate", verbosity=0)


def post(url, body, key=None, user="alice", cookie_auth=False, extra_headers=None):
    client = Client(raise_request_exception=os.environ.get("RAISE") == "1")
    headers = {}
    if key is not None:
        headers["HTTP_IDEMPOTENCY_KEY"] = key
    if user and not cookie_auth:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {user}"
    if user and cookie_auth:
        client.cookies["user"] = user
    headers.update(extra_headers or {})
    try:
        r = client.post(url, json.dumps(body), content_type="application/json", **headers)
    except Exception as exc:
        return {"status": "raised " + type(exc).__name__ + ": " + str(exc)[:150]}
    finally:
        connections.close_all()
    out = {"status": r.status_code}
    try:
        out["body"] = json.loads(r.content)
    except Exception:
        out["body"] = r.content[:120].decode(errors="replace")
    out["location"] = r.headers.get("Location")
    out["set_cookie"] = "sessionid" in r.cookies and r.cookies["sessionid"].value
    return out


def runs(tag="orders"):
    return RUNS.get(tag, 0)


def show(name, *results, extra=""):
    print(
        f"[{PEER}] {name}: "
        + " | ".join(json.dumps(r, default=str) for r in results)
        + (f" | {extra}" if extra else "")
    )


def scenario(name, fn):
    dict(RUNS)
    try:
        fn()
    except Exception as exc:
        print(f"[{PEER}] {name}: harness error {type(exc).__name__}: {exc}")
    finally:
        pass


def new():
    return str(uuid.uuid4())


def s_replay():
    k = new()
    r0 = runs()
    a = post("/orders/", {"amount": 1}, k)
    b = post("/orders/", {"amount": 1}, k)
    show("same key retried", a, b, extra=f"view ran {runs() - r0}x")


def s_cross_user(cookie_auth):
    k = new()
    r0 = runs()
    a = post("/orders/", {"amount": 1}, k, user="alice", cookie_auth=cookie_auth)
    b = post("/orders/", {"amount": 1}, k, user="bob", cookie_auth=cookie_auth)
    label = "cross-user (cookie auth)" if cookie_auth else "cross-user (Authorization auth)"
    show(label, a, b, extra=f"view ran {runs() - r0}x")


def s_new_token():
    # the same user retries with a refreshed Authorization header
    k = new()
    r0 = runs()
    a = post("/orders/", {"amount": 1}, k, user="alice")
    b = post(
        "/orders/",
        {"amount": 1},
        k,
        user="alice",
        extra_headers={"HTTP_AUTHORIZATION": "Bearer alice", "HTTP_X_TOKEN": "2"},
    )
    show("retry, same user", a, b, extra=f"view ran {runs() - r0}x")


def s_query():
    k = new()
    r0 = runs()
    a = post("/orders/?account=1", {"amount": 1}, k)
    b = post("/orders/?account=2", {"amount": 1}, k)
    show("query string differs", a, b, extra=f"view ran {runs() - r0}x")


def s_body():
    k = new()
    r0 = runs()
    a = post("/orders/", {"amount": 1}, k)
    b = post("/orders/", {"amount": 2}, k)
    show("body differs", a, b, extra=f"view ran {runs() - r0}x")


def s_reencoded():
    k = new()
    r0 = runs()
    client = Client()
    h = {"HTTP_IDEMPOTENCY_KEY": k, "HTTP_AUTHORIZATION": "Bearer alice"}
    a = client.post("/orders/", '{"amount": 1, "note": "x"}', content_type="application/json", **h)
    b = client.post("/orders/", '{"note":"x","amount":1}', content_type="application/json", **h)
    connections.close_all()
    show(
        "same JSON re-encoded",
        {"status": a.status_code},
        {"status": b.status_code},
        extra=f"view ran {runs() - r0}x",
    )


def s_concurrent():
    k = new()
    r0 = runs()
    barrier = threading.Barrier(4)
    results = []

    def go():
        barrier.wait()
        results.append(post("/orders/", {"amount": 1, "sleep": 0.5}, k)["status"])

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    show("4 concurrent duplicates", sorted(results, key=str), extra=f"view ran {runs() - r0}x")


def s_slow(url):
    k = new()
    r0 = runs()
    res = {}

    def first():
        res["a"] = post(url, {"amount": 1, "sleep": 3}, k)["status"]

    t = threading.Thread(target=first)
    t.start()
    time.sleep(2)
    res["b"] = post(url, {"amount": 1, "sleep": 3}, k)["status"]
    t.join()
    res["c"] = post(url, {"amount": 1, "sleep": 3}, k)["status"]
    show(
        f"slow view 3 s, lock/lease 1 s, retry at 2 s ({url})",
        res,
        extra=f"view ran {runs() - r0}x",
    )


def s_flaky():
    k = new()
    a = post("/flaky/", {}, k)
    b = post("/flaky/", {}, k)
    show("view returns 503 then 201, same key", a, b, extra=f"view ran {runs('flaky')}x")


def s_missing(url):
    r0 = runs()
    a = post(url, {"amount": 1}, None)
    show(f"no key ({url})", a, extra=f"view ran {runs() - r0}x")


def s_syntax():
    u = new()
    for label, key in (
        ("bare UUID", u),
        ("sf-string UUID", f'"{new()}"'),
        ("bare non-UUID", "order-42-" + new()[:8]),
        ("sf-string non-UUID", '"order-42-' + new()[:8] + '"'),
    ):
        r0 = runs()
        a = post("/orders/", {"amount": 1}, key)
        show(f"key syntax {label}", {"status": a["status"]}, extra=f"view ran {runs() - r0}x")
    # quoted and bare form of one key: the same key?
    k = new()
    r0 = runs()
    a = post("/orders/", {"amount": 1}, k)
    b = post("/orders/", {"amount": 1}, f'"{k}"')
    show(
        "bare then quoted form of one key",
        {"status": a["status"]},
        {"status": b["status"]},
        extra=f"view ran {runs() - r0}x",
    )


def s_anonymous():
    k = new()
    r0 = runs()
    a = post("/orders/", {"amount": 1}, k, user=None)
    b = post("/orders/", {"amount": 1}, k, user=None)
    show("anonymous caller retried", a, b, extra=f"view ran {runs() - r0}x")


def s_store_down():
    r0 = runs()
    a = post("/orders/", {"amount": 1}, new())
    show("store unreachable", a, extra=f"view ran {runs() - r0}x")


if STORE_DOWN:
    scenario("store down", s_store_down)
    sys.exit(0)

only = os.environ.get("ONLY")
plan = [
    ("replay", s_replay),
    ("cross-user auth", lambda: s_cross_user(False)),
    ("cross-user cookie", lambda: s_cross_user(True)),
    ("query", s_query),
    ("body", s_body),
    ("reencoded", s_reencoded),
    ("syntax", s_syntax),
    ("missing", lambda: (s_missing("/orders/"), s_missing("/required/orders/"))),
    ("anonymous", s_anonymous),
    ("flaky", s_flaky),
    ("concurrent", s_concurrent),
    ("slow", lambda: (s_slow("/orders/"), PEER == "ours" and s_slow("/lease/orders/"))),
]
for name, fn in plan:
    if not only or name in only.split(","):
        scenario(name, fn)

connections.close_all()
import psycopg

with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
    c.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
