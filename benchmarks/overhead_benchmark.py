#!/usr/bin/env python3
"""Overhead benchmark: what ``@idempotent`` adds to one request, in-process, per request.

    python benchmarks/overhead_benchmark.py                      # PostgreSQL (DATABASE_URL)
    python benchmarks/overhead_benchmark.py --database mariadb   # MariaDB (MARIADB_URL)

It creates its own database (``idempotency_overhead_bench`` on the server of DATABASE_URL,
default ``postgres://postgres@127.0.0.1:5432/postgres``, or with ``--database mariadb`` on
MARIADB_URL, default ``mysql://root@127.0.0.1:3306/test``) and drops it at the end. Figures go
into docs/performance.md unless ``--no-docs``.

One anonymous JSON endpoint whose view does one ``INSERT`` (the least a creating endpoint
does) is served four ways, one request at a time from one thread:

* **undecorated view**: the view alone, no key: what everything else is compared with;
* **first execution, atomic**: ``@idempotent``, a fresh key per request (the default mode);
* **first execution, lease**: ``@idempotent(atomic=False)``, a fresh key per request;
* **replay**: ``@idempotent``, a finished key sent again with the same request.

Scenarios take turns over ``--rounds`` rounds, in a rotating order, so machine drift (other
load, the database's caches) hits all of them alike. Reported per scenario: milliseconds per
request (p50 and mean), SQL statements per request (counted with an execute wrapper, so
without ``BEGIN``/``COMMIT``, which drivers send themselves) and the ratio of its mean to the
undecorated view's: the throughput one worker keeps, on a machine where the database's work
counts too, as it shares the cores.

Requests go through Django's WSGI handler in this process, with no middleware: no HTTP
parsing, no network hop, no load generator sharing the cores. What differs between the
scenarios is exactly this package's work, Python and SQL, so this is the benchmark to run
when changing the request path; ``benchmarks/load_benchmark.py`` measures the whole stack.
``--profile`` prints a cProfile of each scenario after the rounds.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from docs_section import write_section  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "performance.md"
BENCHMARK_DATABASE = "idempotency_overhead_bench"
DEFAULT_URLS = {
    "postgresql": ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
    "mariadb": ("MARIADB_URL", "mysql://root@127.0.0.1:3306/test"),
}
START, END = "<!-- overhead-benchmark:start -->", "<!-- overhead-benchmark:end -->"
BODY = b'{"sku": "BOOK-1", "quantity": 2, "customer": "c-4242"}'
ORDERS = "overhead_bench_order"

sys.path.insert(0, str(ROOT))


def database_url(arguments: argparse.Namespace) -> str:
    variable, default = DEFAULT_URLS[arguments.database]
    return os.environ.get(variable, default)


def configure(arguments: argparse.Namespace) -> None:
    import dj_database_url
    import django
    from django.conf import settings

    database = dj_database_url.parse(database_url(arguments))
    database["NAME"] = BENCHMARK_DATABASE
    database["CONN_MAX_AGE"] = None  # persistent, as any production set-up
    settings.configure(
        DEBUG=False,
        SECRET_KEY="overhead-benchmark",
        USE_TZ=True,
        TIME_ZONE="UTC",
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "django_idempotency"],
        DATABASES={"default": database},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
    )
    django.setup()


# -- The endpoint ------------------------------------------------------------------------------


def _urlpatterns() -> list[object]:
    from django.db import connection
    from django.http import JsonResponse
    from django.urls import path

    from django_idempotency.decorators import idempotent

    def create_order(request: Any) -> JsonResponse:
        number = uuid.uuid4().hex
        with connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {ORDERS} (number, body) VALUES (%s, %s)", [number, BODY])
        response = JsonResponse(
            {"id": number, "status": "created", "sku": "BOOK-1", "quantity": 2}, status=201
        )
        response["Location"] = f"/orders/{number}/"
        return response

    return [
        path("plain/", create_order),
        path("atomic/", idempotent(create_order)),
        path("lease/", idempotent(atomic=False)(create_order)),
    ]


def __getattr__(name: str) -> object:  # the URLconf, built once Django is set up
    if name == "urlpatterns":
        patterns = _urlpatterns()
        globals()["urlpatterns"] = patterns
        return patterns
    raise AttributeError(name)


# -- Set-up ------------------------------------------------------------------------------------


def server_command(arguments: argparse.Namespace, sql: str) -> None:
    """Run ``sql`` on the server's maintenance database (CREATE / DROP DATABASE)."""
    url = urlsplit(database_url(arguments))
    if arguments.database == "postgresql":
        import psycopg

        with psycopg.connect(
            host=url.hostname or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password or None,
            dbname=(url.path or "/postgres").lstrip("/") or "postgres",
            autocommit=True,
        ) as connection:
            connection.execute(sql)
        return
    import MySQLdb

    connection = MySQLdb.connect(
        host=url.hostname or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
    )
    try:
        connection.cursor().execute(sql)
    finally:
        connection.close()


def create_orders_table() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"CREATE TABLE {ORDERS} (id bigserial PRIMARY KEY, number varchar(32) NOT NULL, "
                "body bytea NOT NULL, created timestamptz NOT NULL DEFAULT now())"
            )
        else:
            cursor.execute(
                f"CREATE TABLE {ORDERS} (id bigint AUTO_INCREMENT PRIMARY KEY, "
                "number varchar(32) NOT NULL, body longblob NOT NULL, "
                "created datetime(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"
            )


# -- Requests ----------------------------------------------------------------------------------


class Handler:
    """Django's WSGI handler, called the way a WSGI server calls it."""

    def __init__(self) -> None:
        from django.core.handlers.wsgi import WSGIHandler

        self.application = WSGIHandler()

    def post(self, path: str, key: str | None) -> tuple[str, bytes, dict[str, str]]:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": path,
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "SERVER_NAME": "benchmark",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(BODY)),
            "wsgi.input": io.BytesIO(BODY),
            "wsgi.errors": sys.stderr,
            "wsgi.url_scheme": "http",
            "wsgi.version": (1, 0),
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        if key is not None:
            environ["HTTP_IDEMPOTENCY_KEY"] = key
        answer: dict[str, Any] = {}

        def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
            answer["status"] = status
            answer["headers"] = dict(response_headers)

        result = self.application(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            getattr(result, "close", lambda: None)()
        return answer["status"], body, answer["headers"]


class QueryCounter:
    """Counts the SQL statements the connection sends."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        self.count += 1
        return execute(sql, params, many, context)


@dataclass
class Scenario:
    name: str
    path: str
    #: "none": no key; "fresh": a new key per request; "replay": a finished key again.
    keys: str
    latencies: list[float] = field(default_factory=list)
    queries: int = 0
    finished: list[str] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies) * 1000

    @property
    def queries_per_request(self) -> float:
        return self.queries / len(self.latencies)


def key_for(scenario: Scenario, index: int) -> str | None:
    if scenario.keys == "none":
        return None
    if scenario.keys == "fresh":
        return uuid.uuid4().hex
    return scenario.finished[index % len(scenario.finished)]


def run_round(handler: Handler, scenario: Scenario, requests: int, *, counted: bool) -> None:
    from django.db import connection

    counter = QueryCounter()
    keys = [key_for(scenario, index) for index in range(requests)]
    latencies = []
    with connection.execute_wrapper(counter):
        for key in keys:
            started = time.perf_counter()
            status, body, headers = handler.post(scenario.path, key)
            latencies.append(time.perf_counter() - started)
            replayed = headers.get("Idempotent-Replayed") == "true"
            if not status.startswith("201") or replayed != (scenario.keys == "replay"):
                raise SystemExit(f"{scenario.name}: answered {status}: {body[:200]!r}")
    if counted:
        scenario.latencies += latencies
        scenario.queries += counter.count


# -- The run -----------------------------------------------------------------------------------


def run(arguments: argparse.Namespace) -> str:
    from django.core.management import call_command
    from django.db import connection

    scenarios = [
        Scenario("undecorated view", "/plain/", "none"),
        Scenario("first execution, atomic mode", "/atomic/", "fresh"),
        Scenario("first execution, lease mode", "/lease/", "fresh"),
        Scenario("replay", "/atomic/", "replay"),
    ]
    say(f"creating database {BENCHMARK_DATABASE}")
    server_command(arguments, f"DROP DATABASE IF EXISTS {BENCHMARK_DATABASE}")
    server_command(arguments, f"CREATE DATABASE {BENCHMARK_DATABASE}")
    try:
        call_command("migrate", "django_idempotency", verbosity=0)
        create_orders_table()
        with connection.cursor() as cursor:
            cursor.execute("SELECT version()")
            (version,) = cursor.fetchone()
        handler = Handler()
        replay = scenarios[-1]
        for _ in range(arguments.requests):
            key = uuid.uuid4().hex
            status, body, _ = handler.post(replay.path, key)
            if not status.startswith("201"):
                raise SystemExit(f"first request answered {status}: {body[:200]!r}")
            replay.finished.append(key)

        for number in range(arguments.rounds + 1):  # round 0 warms up, and is not counted
            order = scenarios[number % len(scenarios) :] + scenarios[: number % len(scenarios)]
            for scenario in order:
                run_round(handler, scenario, arguments.requests, counted=number > 0)
            if number:
                say(
                    f"after round {number}/{arguments.rounds}: "
                    + ", ".join(f"{s.name} {s.mean_ms:.2f} ms" for s in scenarios)
                )
        if arguments.profile:
            for scenario in scenarios:
                profile(handler, scenario, arguments.requests)
    finally:
        connection.close()
        if not arguments.keep:
            server_command(arguments, f"DROP DATABASE IF EXISTS {BENCHMARK_DATABASE}")
    return report(arguments, version, scenarios)


def profile(handler: Handler, scenario: Scenario, requests: int) -> None:
    """Print where ``scenario``'s requests spend their time (cProfile)."""
    import cProfile
    import pstats

    keys = [key_for(scenario, index) for index in range(requests)]
    profiler = cProfile.Profile()
    profiler.enable()
    for key in keys:
        handler.post(scenario.path, key)
    profiler.disable()
    say(f"profile of {requests:,} requests, {scenario.name}:")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


def report(arguments: argparse.Namespace, version: str, scenarios: list[Scenario]) -> str:
    import django

    base = scenarios[0]
    server = "PostgreSQL" if arguments.database == "postgresql" else ""
    server = server or ("MariaDB" if "MariaDB" in version else "MySQL")
    version = version.split()[1] if server == "PostgreSQL" else version.split("-")[0]
    lines = [
        f"Measured by `python benchmarks/overhead_benchmark.py"
        f"{' --database mariadb' if arguments.database == 'mariadb' else ''}` on "
        f"{time.strftime('%Y-%m-%d')}: {server} {version} on this machine, {os.cpu_count()} CPU "
        f"cores, Python {sys.version.split()[0]}, Django {django.get_version()}. "
        f"{arguments.requests:,} requests per scenario and round, one at a time through "
        f"Django's WSGI handler in-process (no middleware), {arguments.rounds} interleaved "
        f"rounds; persistent database connections.",
        "",
        "| scenario | p50 | mean | SQL statements per request | ratio to the undecorated view |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for scenario in scenarios:
        lines.append(
            f"| {scenario.name} | {scenario.p50_ms:.2f} ms | {scenario.mean_ms:.2f} ms | "
            f"{scenario.queries_per_request:g} | {base.mean_ms / scenario.mean_ms:.2f}x |"
        )
    return "\n".join(lines)


def write_docs(figures: str) -> None:
    write_section(DOCS, START, END, figures)


def say(message: str) -> None:
    print(f"overhead_benchmark: {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database", choices=["postgresql", "mariadb"], default="postgresql", help="the server"
    )
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds measured")
    parser.add_argument("--profile", action="store_true", help="profile each scenario")
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
