#!/usr/bin/env python3
"""Replay cache benchmark: replays from PostgreSQL alone vs PostgreSQL + a Redis replay cache.

    python benchmarks/replay_cache_benchmark.py    # DATABASE_URL=postgres://... REDIS_URL=redis://...

It creates its own database (``idempotency_replay_benchmark`` on the server of DATABASE_URL,
default ``postgres://postgres@127.0.0.1:5432/postgres``) and drops it at the end, and keeps its
Redis entries (on REDIS_URL, default ``redis://127.0.0.1:6379/0``) under its own key prefix,
deleting only those. Figures go into docs/performance.md unless ``--no-docs``.

One anonymous JSON endpoint under ``@idempotent`` (the default atomic mode) first answers
``--keys`` requests, each with its own key; then every variant replays those keys:

* **database store**: ``DatabaseStore``, no replay cache: each replay reads the key's row;
* **database store + replay cache**: the same store and rows, ``IDEMPOTENCY_REPLAY_CACHE``
  naming the Redis cache: each replay is one Redis ``GET``;
* **cache store** (for comparison): ``CacheStore`` on the same Redis: one Lua script per replay.

Variants take turns over ``--rounds`` rounds, in a rotating order, so machine drift (other
load, CPU frequency, the database's caches) hits all of them alike. Reported per variant:
replays per second, p50 and p99 latency, database queries per replay (counted with an
execute wrapper on every replay) and the throughput ratio to the database store.

Requests go through Django's WSGI handler in this process, not through an HTTP server: what
differs between the variants is the package's own work (one SELECT vs one Redis GET), and on
a small machine an HTTP server and its load generator would share the cores with PostgreSQL
and Redis, adding the same socket and HTTP-parsing cost to every variant plus a great deal
of noise. The ratio measured here is therefore the upper bound of what a deployment sees;
the more a real request does besides the replay (middleware, authentication, the network),
the closer to 1 it gets. The absolute figures are this machine's, the ratio is the result.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from docs_section import write_section  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "performance.md"
BENCHMARK_DATABASE = "idempotency_replay_benchmark"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
KEY_PREFIX = "idempotency-replay-benchmark"
START, END = "<!-- replay-cache-benchmark:start -->", "<!-- replay-cache-benchmark:end -->"
PATH = "/orders/"
BODY = b'{"sku": "BOOK-1", "quantity": 2, "customer": "c-4242"}'

sys.path.insert(0, str(ROOT))


def configure(arguments: argparse.Namespace) -> None:
    import dj_database_url
    import django
    from django.conf import settings

    database = dj_database_url.parse(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    database["NAME"] = BENCHMARK_DATABASE
    # Persistent connections by default: Django's own default (0) opens a connection per
    # request, which would dominate the database store's figures (see --conn-max-age).
    database["CONN_MAX_AGE"] = arguments.conn_max_age
    redis = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
        "KEY_PREFIX": KEY_PREFIX,
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
    }
    settings.configure(
        DEBUG=False,
        SECRET_KEY="replay-cache-benchmark",
        USE_TZ=True,
        TIME_ZONE="UTC",
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "django_idempotency"],
        DATABASES={"default": database},
        CACHES={
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            "redis": redis,
        },
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        IDEMPOTENCY_STORE_CACHE="redis",
    )
    django.setup()


# -- The endpoint ------------------------------------------------------------------------------


def _urlpatterns() -> list[object]:
    from django.http import JsonResponse
    from django.urls import path

    from django_idempotency.decorators import idempotent

    @idempotent
    def create_order(request: Any) -> JsonResponse:
        # A typical creation answer: the new resource, a few hundred bytes, and its Location.
        response = JsonResponse(
            {
                "id": uuid.uuid4().hex,
                "status": "created",
                "sku": "BOOK-1",
                "quantity": 2,
                "customer": "c-4242",
                "total": {"amount": "39.80", "currency": "EUR"},
                "lines": [{"sku": "BOOK-1", "price": "19.90", "quantity": 2}],
            },
            status=201,
        )
        response["Location"] = f"/orders/{uuid.uuid4().hex}/"
        return response

    return [path(PATH.strip("/") + "/", create_order)]


def __getattr__(name: str) -> object:  # the URLconf, built once Django is set up
    if name == "urlpatterns":
        patterns = _urlpatterns()
        globals()["urlpatterns"] = patterns
        return patterns
    raise AttributeError(name)


# -- Set-up ------------------------------------------------------------------------------------


def server_command(sql: str) -> None:
    """Run ``sql`` on the server's maintenance database (CREATE / DROP DATABASE)."""
    import psycopg

    url = urlsplit(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    with psycopg.connect(
        host=url.hostname or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password or None,
        dbname=(url.path or "/postgres").lstrip("/") or "postgres",
        autocommit=True,
    ) as connection:
        connection.execute(sql)


@dataclass(frozen=True)
class Variant:
    name: str
    store: str
    replay_cache: str | None
    keys: list[str] = field(default_factory=list)


def use(variant: Variant) -> None:
    """Switch this process to ``variant`` (settings are read at call time)."""
    from django.conf import settings

    from django_idempotency.conf import get_store

    settings.IDEMPOTENCY_STORE = variant.store
    settings.IDEMPOTENCY_REPLAY_CACHE = variant.replay_cache
    get_store.cache_clear()  # assigning a setting does not send setting_changed


def forget_redis() -> None:
    from django.core.cache import caches

    caches["redis"].delete_pattern("*")  # KEY_PREFIX: only this benchmark's entries


# -- Requests ----------------------------------------------------------------------------------


class Handler:
    """Django's WSGI handler, called the way a WSGI server calls it."""

    def __init__(self) -> None:
        from django.core.handlers.wsgi import WSGIHandler

        self.application = WSGIHandler()
        self.status = ""

    def post(self, key: str) -> tuple[str, bytes, dict[str, str]]:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": PATH,
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "SERVER_NAME": "benchmark",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(BODY)),
            "HTTP_IDEMPOTENCY_KEY": key,
            "wsgi.input": io.BytesIO(BODY),
            "wsgi.errors": sys.stderr,
            "wsgi.url_scheme": "http",
            "wsgi.version": (1, 0),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        headers: dict[str, str] = {}

        def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
            self.status = status
            headers.update(response_headers)

        result = self.application(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            getattr(result, "close", lambda: None)()
        return self.status, body, headers


class QueryCounter:
    """Counts the SQL statements this thread's connection sends."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        self.count += 1
        return execute(sql, params, many, context)


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    queries: int = 0
    errors: list[str] = field(default_factory=list)


def first_requests(variant: Variant, count: int) -> dict[str, bytes]:
    """Send ``count`` first requests under ``variant``; return each key's answer."""
    handler = Handler()
    answers = {}
    for _ in range(count):
        key = uuid.uuid4().hex
        status, body, _ = handler.post(key)
        if not status.startswith("201"):
            raise SystemExit(f"first request answered {status}: {body[:200]!r}")
        answers[key] = body
        variant.keys.append(key)
    return answers


def replay_round(keys: list[str], answers: dict[str, bytes], threads: int) -> Sample:
    """Replay every key once, split over ``threads`` threads."""
    from django.db import connection

    sample = Sample()
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def work(mine: list[str]) -> None:
        handler, counter, latencies, errors = Handler(), QueryCounter(), [], []
        handler.post(mine[0])  # opens this thread's connections, not timed
        barrier.wait()
        with connection.execute_wrapper(counter):
            for key in mine:
                started = time.perf_counter()
                status, body, headers = handler.post(key)
                latencies.append(time.perf_counter() - started)
                if body != answers[key] or headers.get("Idempotent-Replayed") != "true":
                    errors.append(f"{key}: {status} {body[:120]!r}")
        connection.close()
        with lock:
            sample.latencies += latencies
            sample.queries += counter.count
            sample.errors += errors

    workers = [
        threading.Thread(target=work, args=(keys[index::threads],)) for index in range(threads)
    ]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    sample.seconds = time.perf_counter() - started
    if sample.errors:
        raise SystemExit(f"{len(sample.errors)} replays were wrong, first: {sample.errors[0]}")
    return sample


# -- The run -----------------------------------------------------------------------------------


@dataclass
class Result:
    variant: Variant
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    queries: int = 0

    @property
    def replays(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.replays / self.seconds

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000

    @property
    def queries_per_replay(self) -> float:
        return self.queries / self.replays


def run(arguments: argparse.Namespace) -> str:
    from django.core.management import call_command
    from django.db import connection

    variants = [
        Variant("database store", "django_idempotency.stores.DatabaseStore", None),
        Variant(
            "database store + replay cache", "django_idempotency.stores.DatabaseStore", "redis"
        ),
    ]
    if arguments.cache_store:
        variants.append(Variant("cache store", "django_idempotency.stores.CacheStore", None))
    say(f"creating database {BENCHMARK_DATABASE}")
    server_command(f"DROP DATABASE IF EXISTS {BENCHMARK_DATABASE}")
    server_command(f"CREATE DATABASE {BENCHMARK_DATABASE}")
    forget_redis()
    try:
        call_command("migrate", "django_idempotency", verbosity=0)
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            (postgres,) = cursor.fetchone()
        from django.core.cache import caches

        redis_version = caches["redis"].client.get_client().info("server")["redis_version"]

        # The two database variants replay the same rows; the replay cache variant's first
        # requests (made with the cache on) are what put them into Redis too.
        say(f"{arguments.keys:,} first requests per store")
        use(variants[1])
        answers = first_requests(variants[1], arguments.keys)
        variants[0].keys.extend(variants[1].keys)
        if arguments.cache_store:
            use(variants[2])
            answers.update(first_requests(variants[2], arguments.keys))
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE django_idempotency_idempotencykey")

        results = {variant.name: Result(variant) for variant in variants}
        for number in range(arguments.rounds + 1):  # round 0 warms up, and is not counted
            order = variants[number % len(variants) :] + variants[: number % len(variants)]
            for variant in order:
                use(variant)
                sample = replay_round(variant.keys, answers, arguments.threads)
                if number == 0:
                    continue
                result = results[variant.name]
                result.latencies += sample.latencies
                result.seconds += sample.seconds
                result.queries += sample.queries
            if number:
                say(
                    f"after round {number}/{arguments.rounds}: "
                    + ", ".join(f"{r.variant.name} {r.rate:,.0f}/s" for r in results.values())
                )
        if arguments.profile:
            for variant in variants:
                use(variant)
                profile(variant, answers)
    finally:
        connection.close()
        forget_redis()
        if not arguments.keep:
            server_command(f"DROP DATABASE IF EXISTS {BENCHMARK_DATABASE}")
    return report(arguments, postgres, redis_version, list(results.values()))


def profile(variant: Variant, answers: dict[str, bytes]) -> None:
    """Print where one thread's replays of ``variant`` spend their time (cProfile)."""
    import cProfile
    import pstats

    handler = Handler()
    handler.post(variant.keys[0])
    profiler = cProfile.Profile()
    profiler.enable()
    for key in variant.keys:
        handler.post(key)
    profiler.disable()
    say(f"profile of {len(variant.keys):,} replays, {variant.name}:")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(25)
    stats.sort_stats("tottime").print_stats(15)


def report(
    arguments: argparse.Namespace, postgres: str, redis_version: str, results: list[Result]
) -> str:
    base = results[0]
    threads = "one thread" if arguments.threads == 1 else f"{arguments.threads} threads"
    if arguments.conn_max_age is None:
        connections = "persistent database connections (`CONN_MAX_AGE = None`)"
    else:
        connections = f"`CONN_MAX_AGE = {arguments.conn_max_age}`"
    lines = [
        f"Measured by `python benchmarks/replay_cache_benchmark.py` on "
        f"{time.strftime('%Y-%m-%d')}: PostgreSQL {postgres.split()[0]} and Redis "
        f"{redis_version} on this machine, {os.cpu_count()} CPU cores shared by both, "
        f"Python {sys.version.split()[0]}. {arguments.keys:,} keys replayed once per round "
        f"from {threads} through Django's WSGI handler in-process (no middleware), "
        f"{arguments.rounds} interleaved rounds; {connections}.",
        "",
        "| store | replays | replays/s | p50 | p99 | DB queries per replay | throughput ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        lines.append(
            f"| {result.variant.name} | {result.replays:,} | {result.rate:,.0f} | "
            f"{result.p50_ms:.2f} ms | {result.p99_ms:.2f} ms | "
            f"{result.queries_per_replay:g} | {result.rate / base.rate:.2f}x |"
        )
    return "\n".join(lines)


def write_docs(figures: str) -> None:
    write_section(DOCS, START, END, figures)


def say(message: str) -> None:
    print(f"replay_cache_benchmark: {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=2000, help="keys replayed in each round")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds measured")
    parser.add_argument("--threads", type=int, default=1, help="threads sending replays")
    parser.add_argument(
        "--conn-max-age",
        type=lambda value: None if value == "none" else int(value),
        default=None,
        help="CONN_MAX_AGE of the database: none (persistent, the default) or seconds",
    )
    parser.add_argument(
        "--no-cache-store", dest="cache_store", action="store_false", help="skip the cache store"
    )
    parser.add_argument("--profile", action="store_true", help="profile one round of each store")
    parser.add_argument("--no-docs", action="store_true", help=f"do not rewrite {DOCS.name}")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    arguments = parser.parse_args()
    configure(arguments)
    figures = run(arguments)
    print()
    print(figures)
    if not arguments.no_docs:
        write_docs(figures)
        say(f"figures written into {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
