#!/usr/bin/env python3
"""Purge benchmark: purge_idempotency_keys on 1,000,000 expired keys in PostgreSQL.

    python benchmarks/purge_benchmark.py            # the full run, figures into docs/purge.md
    python benchmarks/purge_benchmark.py --rows 100000 --no-docs   # a quick look

It creates its own database (``idempotency_purge_benchmark`` on the server of DATABASE_URL,
default ``postgres://postgres@127.0.0.1:5432/postgres``) and drops it at the end. Two parts:

1. **Purge rate.** Fill the table with ``--rows`` expired keys (and a tenth as many live ones,
   which must survive) with one ``INSERT ... SELECT generate_series``, then time
   ``manage.py purge_idempotency_keys`` in its own process: rows per second.
2. **Requests during a purge.** Fill the table again, then measure the latency of idempotent
   requests (each with a fresh key, one in four replaying a recent one) sent through Django's
   handler by ``--threads`` threads: first with no purge (baseline), then while the command
   purges in another process, then again with no purge. Reported: p50 and p99 of each phase,
   and the ratio of the p99 during the purge to the baseline's.

The load and the database share this machine's cores, so the figures to compare are ratios
between phases of the same run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from docs_section import write_section  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "purge.md"
BENCHMARK_DATABASE = "idempotency_purge_benchmark"
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/postgres"
START, END = "<!-- purge-benchmark:start -->", "<!-- purge-benchmark:end -->"

sys.path.insert(0, str(ROOT))


def configure() -> None:
    """Django settings for this process and for the purge command it starts."""
    import dj_database_url
    import django
    from django.conf import settings

    database = dj_database_url.parse(os.environ.get("DATABASE_URL", DEFAULT_URL))
    database["NAME"] = BENCHMARK_DATABASE
    # The admin (``plans``) needs its apps and middleware; the purge and the load need neither.
    admin = sys.argv[1:2] == ["plans"]
    settings.configure(
        DEBUG=False,
        SECRET_KEY="purge-benchmark",
        USE_TZ=True,
        TIME_ZONE="UTC",
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=[
            *(
                ["django.contrib.admin", "django.contrib.sessions", "django.contrib.messages"]
                if admin
                else []
            ),
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django_idempotency",
        ],
        DATABASES={"default": database},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ]
        if admin
        else [],
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {
                    "context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages",
                    ]
                },
            }
        ],
    )
    django.setup()


# -- The view under load -------------------------------------------------------------------------


def _urlpatterns() -> list[object]:
    from django.http import JsonResponse
    from django.urls import path

    from django_idempotency.decorators import idempotent

    @idempotent
    def create_order(request: object) -> JsonResponse:
        return JsonResponse({"id": 1, "status": "created"}, status=201)

    patterns = [path("orders/", create_order)]
    if sys.argv[1:2] == ["plans"]:
        from django.contrib import admin

        patterns.append(path("admin/", admin.site.urls))
    return patterns


def __getattr__(name: str) -> object:  # the URLconf, built once Django is set up
    if name == "urlpatterns":
        patterns = _urlpatterns()
        globals()["urlpatterns"] = patterns
        return patterns
    raise AttributeError(name)


# -- Database set-up -----------------------------------------------------------------------------


def server_command(sql: str) -> None:
    """Run ``sql`` on the server's maintenance database (CREATE / DROP DATABASE)."""
    import psycopg

    url = urlsplit(os.environ.get("DATABASE_URL", DEFAULT_URL))
    with psycopg.connect(
        host=url.hostname or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password or None,
        dbname=(url.path or "/postgres").lstrip("/") or "postgres",
        autocommit=True,
    ) as connection:
        connection.execute(sql)


def fill(expired: int, live: int) -> float:
    """Insert ``expired`` expired keys and ``live`` live ones; return the seconds it took."""
    from django.db import connection

    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE django_idempotency_idempotencykey")
        for count, expiry, prefix in (
            (expired, "- interval '1 day'", "old"),
            (live, "+ interval '1 day'", "new"),
        ):
            # Keys as a JSON API leaves them: a 201 with a small body and its headers.
            cursor.execute(
                f"""
                INSERT INTO django_idempotency_idempotencykey
                    (scope, key, state, fingerprint, method, path, owner_token, response_status,
                     response_headers, response_body, created_at, completed_at, expires_at,
                     locked_until)
                SELECT 'user:' || (g %% 5000), '{prefix}-' || g, 'completed',
                       md5(g::text) || md5((g + 1)::text), 'POST', '/api/orders/',
                       md5((g + 2)::text), 201,
                       '[["Content-Type", "application/json"], ["Location", "/api/orders/1/"]]',
                       convert_to('{{"id": ' || g || ', "status": "created"}}', 'UTF8'),
                       now() - interval '1 day' + g * interval '1 ms',
                       now() - interval '1 day' + g * interval '1 ms',
                       now() {expiry} - interval '1 hour' + g * interval '1 ms', NULL
                FROM generate_series(1, %s) AS g
                """,
                [count],
            )
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE django_idempotency_idempotencykey")
    return time.monotonic() - started


def count_keys() -> tuple[int, int]:
    from django_idempotency.models import IdempotencyKey

    return IdempotencyKey.objects.expired().count(), IdempotencyKey.objects.live().count()


# -- The purge command, in its own process -------------------------------------------------------


def start_purge(batch_size: int | None) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, "manage", "purge_idempotency_keys", "-v", "1"]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@dataclass
class PurgeRun:
    deleted: int
    seconds: float
    output: str

    @property
    def rate(self) -> float:
        return self.deleted / self.seconds


def finish_purge(process: subprocess.Popen[str], started: float) -> PurgeRun:
    output, _ = process.communicate()
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"purge_idempotency_keys failed:\n{output}")
    match = re.search(r"Deleted ([\d,]+) expired idempotency keys in ([\d.]+) s", output)
    if not match:
        raise SystemExit(f"unexpected output from purge_idempotency_keys:\n{output}")
    # The command's own timing: from its first batch to its last, without Python's start-up.
    return PurgeRun(int(match[1].replace(",", "")), float(match[2]) or seconds, output.strip())


# -- Load --------------------------------------------------------------------------------------


class Load:
    """``threads`` threads sending idempotent POSTs through Django's handler, timing each one."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self.latencies, self.errors = [], []
        self._workers = [threading.Thread(target=self._run) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()

    def stop(self) -> list[float]:
        self._stop.set()
        for worker in self._workers:
            worker.join()
        if self.errors:
            raise SystemExit(f"{len(self.errors)} requests failed, first: {self.errors[0]}")
        return self.latencies

    def _run(self) -> None:
        from django.db import connection
        from django.test import Client

        client = Client()
        recent: list[str] = []
        mine: list[float] = []
        try:
            number = 0
            while not self._stop.is_set():
                number += 1
                replay = number % 4 == 0 and recent
                key = recent[-1] if replay else uuid.uuid4().hex
                started = time.perf_counter()
                response = client.post(
                    "/orders/",
                    b'{"sku": "BOOK-1", "quantity": 2}',
                    content_type="application/json",
                    headers={"Idempotency-Key": key},
                )
                mine.append(time.perf_counter() - started)
                if response.status_code != 201:
                    self.errors.append(f"{response.status_code} {response.content[:200]!r}")
                recent = [*recent[-20:], key]
        finally:
            connection.close()
            with self._lock:
                self.latencies.extend(mine)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Phase:
    name: str
    latencies: list[float]
    seconds: float

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 0.99) * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


def measure(load: Load, name: str, seconds: float) -> Phase:
    load.start()
    time.sleep(seconds)
    return Phase(name, load.stop(), seconds)


# -- The run -----------------------------------------------------------------------------------


def run(arguments: argparse.Namespace) -> str:
    from django.core.management import call_command
    from django.db import connection

    rows, live = arguments.rows, arguments.rows // 10
    say(f"creating database {BENCHMARK_DATABASE}")
    server_command(f"DROP DATABASE IF EXISTS {BENCHMARK_DATABASE}")
    server_command(f"CREATE DATABASE {BENCHMARK_DATABASE}")
    try:
        call_command("migrate", "django_idempotency", verbosity=0)
        with connection.cursor() as cursor:
            cursor.execute("SELECT version()")
            (version,) = cursor.fetchone()

        say(f"part 1: filling {rows:,} expired and {live:,} live keys")
        fill_seconds = fill(rows, live)
        say(f"  filled in {fill_seconds:.1f} s; purging")
        started = time.monotonic()
        alone = finish_purge(start_purge(arguments.batch_size), started)
        expired_left, live_left = count_keys()
        say(f"  {alone.output}")
        assert (expired_left, live_left) == (0, live), (expired_left, live_left)

        say(f"part 2: filling again, then requests from {arguments.threads} threads")
        fill(rows, live)
        load = Load(arguments.threads)
        measure(load, "warm-up", 3)
        before = measure(load, "no purge (before)", arguments.seconds)
        say(f"  before: p50 {before.p50_ms:.1f} ms, p99 {before.p99_ms:.1f} ms")
        load.start()
        started = time.monotonic()
        during_purge = finish_purge(start_purge(arguments.batch_size), started)
        during = Phase("during the purge", load.stop(), time.monotonic() - started)
        say(f"  during: p50 {during.p50_ms:.1f} ms, p99 {during.p99_ms:.1f} ms")
        after = measure(load, "no purge (after)", arguments.seconds)
        say(f"  after: p50 {after.p50_ms:.1f} ms, p99 {after.p99_ms:.1f} ms")
        expired_left, live_left = count_keys()
        assert expired_left == 0, expired_left
    finally:
        connection.close()
        if not arguments.keep:
            server_command(f"DROP DATABASE IF EXISTS {BENCHMARK_DATABASE}")

    return report(arguments, version, alone, during_purge, [before, during, after])


def report(
    arguments: argparse.Namespace,
    version: str,
    alone: PurgeRun,
    under_load: PurgeRun,
    phases: list[Phase],
) -> str:
    before = phases[0]
    batch = arguments.batch_size or "the default (1,000)"
    lines = [
        f"Measured by `python benchmarks/purge_benchmark.py` on {time.strftime('%Y-%m-%d')}: "
        f"{version.split(',')[0]}, {os.cpu_count()} CPU cores shared by the database, the "
        f"purge and the load; batch size {batch}.",
        "",
        "| purge of expired keys | keys deleted | seconds | keys per second |",
        "| --- | ---: | ---: | ---: |",
        f"| alone | {alone.deleted:,} | {alone.seconds:.1f} | {alone.rate:,.0f} |",
        f"| while requests are served | {under_load.deleted:,} | {under_load.seconds:.1f} | "
        f"{under_load.rate:,.0f} |",
        "",
        f"Idempotent requests from {arguments.threads} threads (fresh keys, one in four a "
        f"replay), with {arguments.rows // 10:,} live keys in the table besides the expired ones "
        "and those the requests add:",
        "",
        "| phase | requests | requests per second | p50 | p99 | p99 / p99 before |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in phases:
        lines.append(
            f"| {phase.name} | {len(phase.latencies):,} | {phase.rate:,.0f} | "
            f"{phase.p50_ms:.1f} ms | {phase.p99_ms:.1f} ms | "
            f"{phase.p99_ms / before.p99_ms:.2f}x |"
        )
    return "\n".join(lines)


def write_docs(figures: str) -> None:
    write_section(DOCS, START, END, figures)


# -- The admin's query plans (``plans``) ------------------------------------------------------

ADMIN_DOCS = ROOT / "docs" / "admin.md"
PLANS_START, PLANS_END = "<!-- admin-plans:start -->", "<!-- admin-plans:end -->"


def fill_realistic(rows: int) -> None:
    """``rows`` keys as months of traffic leave them: mostly 2xx, some 4xx and 5xx, a few
    unfinished; POST mostly; five endpoints; 50,000 users; created over the last ~42 hours
    with a 24-hour TTL, so about 40 % expired."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE django_idempotency_idempotencykey")
        cursor.execute(
            """
            INSERT INTO django_idempotency_idempotencykey
                (scope, key, state, fingerprint, method, path, owner_token, response_status,
                 response_headers, response_body, created_at, completed_at, expires_at,
                 locked_until)
            SELECT 'user:' || (g %% 50000), md5('key' || g),
                   CASE WHEN g %% 2000 = 0 THEN 'in_progress' ELSE 'completed' END,
                   md5(g::text) || md5((g + 1)::text),
                   CASE WHEN g %% 100 = 7 THEN 'DELETE' WHEN g %% 10 = 3 THEN 'PATCH'
                        WHEN g %% 20 = 5 THEN 'PUT' ELSE 'POST' END,
                   '/api/' || (ARRAY['orders', 'payments', 'refunds', 'customers',
                                     'webhooks'])[1 + g %% 5] || '/' || (g %% 10000) || '/',
                   md5((g + 2)::text),
                   CASE WHEN g %% 2000 = 0 THEN NULL WHEN g %% 100 = 1 THEN 503
                        WHEN g %% 20 = 2 THEN 422 ELSE 201 END,
                   CASE WHEN g %% 2000 = 0 THEN '[]'::jsonb
                        ELSE '[["Content-Type", "application/json"]]'::jsonb END,
                   CASE WHEN g %% 2000 = 0 THEN NULL
                        ELSE convert_to('{"id": ' || g || '}', 'UTF8') END,
                   now() - (%s - g) * interval '150 ms',
                   CASE WHEN g %% 2000 = 0 THEN NULL
                        ELSE now() - (%s - g) * interval '150 ms' END,
                   now() - (%s - g) * interval '150 ms' + interval '24 hours',
                   CASE WHEN g %% 4000 = 0 THEN now() + interval '30 seconds' END
            FROM generate_series(1, %s) AS g
            """,
            [rows, rows, rows, rows],
        )
        cursor.execute("VACUUM ANALYZE django_idempotency_idempotencykey")


def admin_scenarios() -> list[tuple[str, str]]:
    from django.utils import timezone

    from django_idempotency.models import IdempotencyKey

    newest = IdempotencyKey.objects.order_by("-created_at").first()
    assert newest is not None
    day = timezone.localtime(newest.created_at)
    return [
        ("the list, newest first", ""),
        ("page 20, the last one", "?p=20"),
        ("search: a key", f"?q={newest.key}"),
        ("search: a scope", "?q=user:4242"),
        ("search: a path prefix", "?q=/api/refunds/"),
        ("filter: in progress", "?state=in_progress"),
        ("filter: in progress, stale", "?state=stale"),
        ("filter: 4xx", "?status=4xx"),
        ("filter: 5xx", "?status=5xx"),
        ("filter: expired", "?expiry=expired"),
        ("filter: live", "?expiry=live"),
        ("filter: method DELETE", "?method=DELETE"),
        (
            "dates: one day",
            f"?created_at__day={day.day}&created_at__month={day.month}&created_at__year={day.year}",
        ),
        ("sorted by expiry", "?o=8"),
        ("a key's page", f"{newest.pk}/change/"),
    ]


def plans(arguments: argparse.Namespace) -> str:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    rows = arguments.rows
    say(f"creating database {BENCHMARK_DATABASE}")
    server_command(f"DROP DATABASE IF EXISTS {BENCHMARK_DATABASE}")
    server_command(f"CREATE DATABASE {BENCHMARK_DATABASE}")
    try:
        call_command("migrate", verbosity=0)
        say(f"filling {rows:,} keys")
        fill_realistic(rows)
        user = get_user_model().objects.create_superuser("admin", "admin@example.com", "admin")
        client = Client()
        client.force_login(user)
        base = "/admin/django_idempotency/idempotencykey/"
        lines = [
            f"Measured by `python benchmarks/purge_benchmark.py plans` on "
            f"{time.strftime('%Y-%m-%d')}: {rows:,} keys on PostgreSQL "
            f"{connection.pg_version // 10000}, warm cache. *Queries* counts the queries on the "
            "key table; *slowest* is the slowest one's execution time in `EXPLAIN ANALYZE`.",
            "",
            "| page | queries | slowest | indexes used | page time |",
            "| --- | ---: | ---: | --- | ---: |",
        ]
        details = []
        for name, url in admin_scenarios():
            client.get(base + url)  # warm the cache
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(base + url)
                page_ms = (time.perf_counter() - started) * 1000
            assert response.status_code == 200, (url, response.status_code)
            ours = [q["sql"] for q in queries if "django_idempotency_idempotencykey" in q["sql"]]
            explained = [explain(connection, sql) for sql in ours]
            slowest = max(explained, key=lambda plan: plan[0])
            indexes = sorted({index for _, plan in explained for index in used_indexes(plan)})
            lines.append(
                f"| {name} | {len(ours)} | {slowest[0]:.1f} ms | "
                f"{', '.join(f'`{index}`' for index in indexes) or 'none'} | {page_ms:.0f} ms |"
            )
            details.append((name, url, ours, explained))
        lines += [
            "",
            "Each list page runs three queries on the key table: the first and last creation "
            "time (for the date hierarchy), a count that stops at 1,001, and the page itself. "
            "The page's query and its plan, for some of them:",
            "",
        ]
        for name, url, ours, explained in details:
            if name not in arguments.show:
                continue
            listing = [i for i, sql in enumerate(ours) if "ORDER BY" in sql and "COUNT(" not in sql]
            index = listing[0] if listing else 0
            lines += [
                f"**{name}** (`{url or '/'}`):",
                "",
                "```sql",
                shorten(ours[index]),
                "```",
                "",
                "```text",
                explained[index][1],
                "```",
                "",
            ]
    finally:
        connection.close()
        if not arguments.keep:
            server_command(f"DROP DATABASE IF EXISTS {BENCHMARK_DATABASE}")
    return "\n".join(lines).rstrip()


def explain(connection: Any, sql: str) -> tuple[float, str]:
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql)
        text = "\n".join(row[0] for row in cursor.fetchall())
    milliseconds = float(re.search(r"Execution Time: ([\d.]+) ms", text)[1])  # type: ignore[index]
    return milliseconds, text


def used_indexes(plan: str) -> set[str]:
    return set(re.findall(r"(?:Index|Index Only) Scan(?: Backward)? using (\w+)", plan)) | set(
        re.findall(r"Bitmap Index Scan on (\w+)", plan)
    )


def shorten(sql: str) -> str:
    """The query as sent, with the table name and the column list made readable."""
    sql = sql.replace('"django_idempotency_idempotencykey".', "").replace(
        '"django_idempotency_idempotencykey"', "keys"
    )
    return re.sub(r"^SELECT (.{60}).*? FROM", r"SELECT \1... FROM", sql, flags=re.S)


def say(message: str) -> None:
    print(f"purge_benchmark: {message}", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["manage"]:  # the purge command, started by the run below
        configure()
        from django.core.management import execute_from_command_line

        execute_from_command_line([sys.argv[0], *sys.argv[2:]])
        return
    if sys.argv[1:2] == ["plans"]:  # the admin's query plans, written into docs/admin.md
        parser = argparse.ArgumentParser(prog="purge_benchmark.py plans")
        parser.add_argument("--rows", type=int, default=1_000_000)
        parser.add_argument("--no-docs", action="store_true")
        parser.add_argument("--keep", action="store_true")
        parser.add_argument(
            "--show",
            nargs="*",
            default=[
                "the list, newest first",
                "search: a key",
                "search: a scope",
                "filter: expired",
            ],
        )
        arguments = parser.parse_args(sys.argv[2:])
        configure()
        report_text = plans(arguments)
        print(report_text)
        if not arguments.no_docs:
            write_section(ADMIN_DOCS, PLANS_START, PLANS_END, report_text)
            say(f"plans written into {ADMIN_DOCS.relative_to(ROOT)}")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="expired keys to purge")
    parser.add_argument("--batch-size", type=int, default=None, help="passed to the command")
    parser.add_argument("--threads", type=int, default=4, help="threads sending requests")
    parser.add_argument("--seconds", type=float, default=15, help="length of each no-purge phase")
    parser.add_argument("--no-docs", action="store_true", help=f"do not rewrite {DOCS.name}")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    arguments = parser.parse_args()
    configure()
    figures = run(arguments)
    print()
    print(figures)
    if not arguments.no_docs:
        write_docs(figures)
        say(f"figures written into {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
