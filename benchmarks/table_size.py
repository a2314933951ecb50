#!/usr/bin/env python3
"""Table size benchmark: bytes per key of the key table, and the purge of its expired keys.

    python benchmarks/table_size.py                      # PostgreSQL, 1,000,000 keys
    python benchmarks/table_size.py --rows 100000        # a quick look
    DATABASE_URL=mysql://root@127.0.0.1:3306/mysql python benchmarks/table_size.py

It creates its own database (``idempotency_table_sizing`` on the server of DATABASE_URL,
default ``postgres://postgres@127.0.0.1:5432/postgres``), migrates it and drops it at the end
(unless ``--keep``). Then:

1. **Fill.** ``--rows`` completed keys, inserted with ``bulk_create`` in batches, as a JSON API
   leaves them: a UUID key, a scope naming the user and the view
   (``user:48213:orders.create``), a SHA-256 fingerprint, a ~300-byte JSON body and four
   response headers. Creation times are spread evenly, oldest first, over the TTL
   (``--ttl-hours``, 24) divided by ``1 - --expired`` (0.1), each key expiring a TTL after its
   creation: so the oldest tenth of the keys has expired, as in a table purged now and then.
   Keys are random UUIDs inserted in creation order, so the indexes are split as production
   traffic splits them (not packed as a fresh ``CREATE INDEX`` packs them).
2. **Size.** After ``VACUUM ANALYZE`` (PostgreSQL) or ``ANALYZE TABLE`` (MariaDB/MySQL): the
   heap (or InnoDB's clustered index), each index by name, TOAST, the total; per key, and
   extrapolated linearly to ``--extrapolate`` (10^8) keys. On PostgreSQL also each index's
   leaf density, when the contrib extension pgstattuple is available.
3. **Purge.** ``manage.py purge_idempotency_keys`` (in this process, ``--batch-size``, default
   the setting's 1,000): keys deleted per second, with the pages read from outside the cache
   and the WAL or redo log written meanwhile. On PostgreSQL, autovacuum is switched off for
   the table during the run, so that the dead tuples left by the purge can be counted
   (``pg_stat_user_tables.n_dead_tup``) and a plain ``VACUUM`` of them timed. On MariaDB and
   MySQL: the history list length after the purge and how long InnoDB's purge threads take to
   bring it back down.

It prints Markdown tables. Linear extrapolation assumes that every key costs what the
measured ones cost: same key, scope and body lengths, and the same B-tree fill.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK_DATABASE = "idempotency_table_sizing"
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/postgres"
TABLE = "django_idempotency_idempotencykey"
VIEWS = (
    ("orders.create", "/api/v1/orders/"),
    ("payments.create", "/api/v1/payments/"),
    ("refunds.create", "/api/v1/refunds/"),
    ("customers.update", "/api/v1/customers/{user}/"),
    ("subscriptions.create", "/api/v1/subscriptions/"),
)

sys.path.insert(0, str(ROOT))


def database_url() -> str:
    return os.environ.get("DATABASE_URL", DEFAULT_URL)


def configure() -> None:
    import dj_database_url
    import django
    from django.conf import settings

    database = dj_database_url.parse(database_url())
    database["NAME"] = BENCHMARK_DATABASE
    settings.configure(
        DEBUG=False,
        SECRET_KEY="table-size-benchmark",
        USE_TZ=True,
        TIME_ZONE="UTC",
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django_idempotency",
        ],
        DATABASES={"default": database},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()


# -- Database set-up -----------------------------------------------------------------------------


def server_command(sql: str) -> None:
    """Run ``sql`` on the server, outside the benchmark database (CREATE / DROP DATABASE)."""
    url = urlsplit(database_url())
    if url.scheme.startswith("postgres"):
        import psycopg

        with psycopg.connect(
            host=url.hostname or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password or None,
            dbname=url.path.lstrip("/") or "postgres",
            autocommit=True,
        ) as connection:
            connection.execute(sql)
    else:
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


def create_database() -> None:
    server_command(f"DROP DATABASE IF EXISTS {BENCHMARK_DATABASE}")
    if urlsplit(database_url()).scheme.startswith("postgres"):
        server_command(f"CREATE DATABASE {BENCHMARK_DATABASE}")
    else:
        server_command(f"CREATE DATABASE {BENCHMARK_DATABASE} CHARACTER SET utf8mb4")


# -- The fill ------------------------------------------------------------------------------------


def body(number: int, user: int, created: datetime) -> bytes:
    """A JSON API's 201 body of about 300 bytes."""
    return json.dumps(
        {
            "id": number,
            "object": "order",
            "status": "created",
            "customer": f"cus_{user:08d}",
            "items": [
                {"sku": f"SKU-{number % 9973:05d}", "quantity": 1 + number % 3, "price": "19.90"},
                {"sku": f"SKU-{number % 7919:05d}", "quantity": 1, "price": "4.50"},
            ],
            "total": "44.30",
            "currency": "EUR",
            "created_at": created.isoformat(timespec="seconds"),
            "links": {"self": f"/api/v1/orders/{number}/"},
        },
        separators=(", ", ": "),
    ).encode()


def fill(rows: int, ttl: timedelta, expired_fraction: float, batch_size: int) -> float:
    """Insert ``rows`` completed keys; return the seconds it took."""
    import random

    from django.utils import timezone

    from django_idempotency.models import IdempotencyKey

    rng = random.Random(20261205)
    now = timezone.now()
    span = ttl / (1 - expired_fraction)  # the oldest ``expired_fraction`` have expired
    oldest = now - span
    started = time.monotonic()
    for first in range(0, rows, batch_size):
        batch = []
        for number in range(first, min(first + batch_size, rows)):
            user = rng.randrange(1, 200_000)
            view, path = VIEWS[number % len(VIEWS)]
            created = oldest + span * (number / rows)
            request_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            batch.append(
                IdempotencyKey(
                    scope=f"user:{user}:{view}",
                    key=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    state=IdempotencyKey.State.COMPLETED,
                    fingerprint=hashlib.sha256(request_id.bytes).hexdigest(),
                    method="POST",
                    path=path.format(user=user),
                    owner_token=uuid.UUID(int=rng.getrandbits(128), version=4).hex,
                    response_status=201,
                    response_headers=[
                        ["Content-Type", "application/json"],
                        ["Location", f"/api/v1/orders/{number}/"],
                        ["Vary", "Accept, Cookie"],
                        ["X-Request-Id", str(request_id)],
                    ],
                    response_body=body(number, user, created),
                    created_at=created,
                    completed_at=created + timedelta(milliseconds=40 + number % 200),
                    expires_at=created + ttl,
                )
            )
        IdempotencyKey.objects.bulk_create(batch)
        if first and first % (10 * batch_size) == 0:
            elapsed = time.monotonic() - started
            say(f"  {first:,} keys in {elapsed:.0f} s")
    return time.monotonic() - started


# -- Sizes ---------------------------------------------------------------------------------------


@dataclass
class Sizes:
    """Bytes of each part of the table, in the order they are reported."""

    parts: dict[str, int] = field(default_factory=dict)
    indexes: list[str] = field(default_factory=list)
    density: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def sizes_postgresql(cursor: Any) -> Sizes:
    cursor.execute(f"VACUUM ANALYZE {TABLE}")
    cursor.execute(
        """
        SELECT pg_relation_size(c.oid, 'main'),
               pg_relation_size(c.oid, 'fsm') + pg_relation_size(c.oid, 'vm'),
               COALESCE(pg_total_relation_size(c.reltoastrelid), 0),
               pg_indexes_size(c.oid), pg_total_relation_size(c.oid)
        FROM pg_class c WHERE c.relname = %s
        """,
        [TABLE],
    )
    heap, maps, toast, indexes_size, total = cursor.fetchone()
    cursor.execute(
        """
        SELECT i.relname, pg_relation_size(i.oid)
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        WHERE t.relname = %s ORDER BY pg_relation_size(i.oid) DESC, i.relname
        """,
        [TABLE],
    )
    sizes = Sizes({"heap": heap, "free space and visibility maps": maps, "TOAST": toast})
    for name, size in cursor.fetchall():
        sizes.parts[f"index `{name}`"] = size
        sizes.indexes.append(f"index `{name}`")
    try:  # how full the leaf pages are, with the contrib extension pgstattuple
        cursor.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    except Exception as exc:  # the densities are a bonus: no extension, no densities
        say(f"  no leaf densities: {exc}")
    else:
        for name in sizes.indexes:
            cursor.execute("SELECT avg_leaf_density FROM pgstatindex(%s)", [name[7:-1]])
            sizes.density[name] = cursor.fetchone()[0]
    assert sum(sizes.parts[name] for name in sizes.indexes) == indexes_size
    assert sizes.total == total, (sizes.total, total)
    return sizes


def sizes_mysql(cursor: Any) -> Sizes:
    cursor.execute(f"ANALYZE TABLE {TABLE}")
    cursor.fetchall()
    cursor.execute("SELECT @@innodb_page_size")
    (page,) = cursor.fetchone()
    cursor.execute(
        "SELECT index_name, stat_value FROM mysql.innodb_index_stats "
        "WHERE database_name = %s AND table_name = %s AND stat_name = 'size' "
        "ORDER BY stat_value DESC, index_name",
        [BENCHMARK_DATABASE, TABLE],
    )
    sizes = Sizes()
    for name, pages in cursor.fetchall():
        if name == "PRIMARY":
            sizes.parts["clustered index (`PRIMARY`, the rows)"] = int(pages) * page
        else:
            sizes.parts[f"index `{name}`"] = int(pages) * page
            sizes.indexes.append(f"index `{name}`")
    cursor.execute(
        "SELECT data_length, index_length, data_free FROM information_schema.tables "
        "WHERE table_schema = %s AND table_name = %s",
        [BENCHMARK_DATABASE, TABLE],
    )
    data, index, free = cursor.fetchone()
    say(f"  information_schema: data_length {data:,}, index_length {index:,}, free {free:,}")
    return sizes


# -- The purge -----------------------------------------------------------------------------------


@dataclass
class Purge:
    expired: int
    deleted: int
    seconds: float
    notes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.deleted / self.seconds


def purge(batch_size: int | None) -> Purge:
    from django.core.management import call_command

    from django_idempotency.models import IdempotencyKey

    expired = IdempotencyKey.objects.expired().count()
    out = StringIO()
    options: dict[str, Any] = {"verbosity": 1, "stdout": out}
    if batch_size:
        options["batch_size"] = batch_size
    started = time.monotonic()
    call_command("purge_idempotency_keys", **options)
    seconds = time.monotonic() - started
    output = out.getvalue()
    say(f"  {output.strip()}")
    match = re.search(r"Deleted ([\d,]+) expired idempotency keys in ([\d.]+) s", output)
    if not match:
        raise SystemExit(f"unexpected output from purge_idempotency_keys:\n{output}")
    return Purge(expired, int(match[1].replace(",", "")), float(match[2]) or seconds)


def counters_postgresql(cursor: Any) -> dict[str, int]:
    """Blocks of the table and its indexes read from outside shared buffers (the OS's cache
    or the disk), and the WAL written, so far."""
    cursor.execute(
        "SELECT heap_blks_read, idx_blks_read, pg_current_wal_lsn() - '0/0'::pg_lsn "
        "FROM pg_statio_user_tables WHERE relname = %s",
        [TABLE],
    )
    heap, index, wal = cursor.fetchone()
    return {
        "heap blocks read outside shared buffers": heap,
        "index blocks read outside shared buffers": index,
        "WAL bytes written (server-wide)": int(wal),
    }


def counters_mysql(cursor: Any) -> dict[str, int]:
    """InnoDB's reads from disk into the buffer pool, fsyncs and redo log bytes, so far
    (server-wide: nothing else ran on the server during the benchmark)."""
    names = {
        "Innodb_buffer_pool_reads": "pages read from disk into the buffer pool",
        "Innodb_data_fsyncs": "fsyncs",
        "Innodb_os_log_written": "redo log bytes written",
    }
    cursor.execute(
        "SELECT variable_name, variable_value FROM information_schema.global_status "
        "WHERE variable_name IN %s",
        [tuple(name.upper() for name in names)],
    )
    values = {name.lower(): int(value) for name, value in cursor.fetchall()}
    return {label: values[name.lower()] for name, label in names.items()}


def after_purge_postgresql(cursor: Any, result: Purge) -> None:
    cursor.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(1.5)  # the statistics of the purge's transactions reach the shared stats
    cursor.execute(
        "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE relname = %s", [TABLE]
    )
    live, dead = cursor.fetchone()
    result.notes.append(("live tuples after the purge (`n_live_tup`)", f"{live:,}"))
    result.notes.append(("dead tuples after the purge (`n_dead_tup`)", f"{dead:,}"))
    started = time.monotonic()
    cursor.execute(f"VACUUM {TABLE}")
    seconds = time.monotonic() - started
    result.notes.append(("`VACUUM` of the table after the purge", f"{seconds:.2f} s"))
    result.notes.append(("dead tuples vacuumed per second", f"{dead / seconds:,.0f}"))
    cursor.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(1.5)
    cursor.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = %s", [TABLE])
    (dead,) = cursor.fetchone()
    result.notes.append(("dead tuples after the `VACUUM`", f"{dead:,}"))


def history_length(cursor: Any) -> int:
    cursor.execute(
        "SELECT count FROM information_schema.innodb_metrics WHERE name = 'trx_rseg_history_len'"
    )
    row = cursor.fetchone()
    return int(row[0]) if row else -1


def after_purge_mysql(cursor: Any, result: Purge, before: int) -> None:
    """The history list counts undo logs of committed transactions (one per purge batch)
    that InnoDB's purge threads have not processed yet: their delete-marked rows are still in
    the clustered and secondary indexes until then."""
    length = history_length(cursor)
    result.notes.append(("InnoDB history list length before the purge", f"{before:,}"))
    result.notes.append(("InnoDB history list length after the purge", f"{length:,}"))
    started = time.monotonic()
    while length > before and time.monotonic() - started < 120:
        time.sleep(0.2)
        length = history_length(cursor)
    seconds = time.monotonic() - started
    result.notes.append(
        (f"time until the history list length is back to {length:,}", f"{seconds:.1f} s")
    )


# -- The run -------------------------------------------------------------------------------------


def run(arguments: argparse.Namespace) -> str:
    from django.core.management import call_command
    from django.db import connection

    say(f"creating database {BENCHMARK_DATABASE}")
    create_database()
    try:
        call_command("migrate", "django_idempotency", verbosity=0)
        postgresql = connection.vendor == "postgresql"
        with connection.cursor() as cursor:
            cursor.execute("SELECT version()")
            (version,) = cursor.fetchone()
            if postgresql:
                cursor.execute(f"ALTER TABLE {TABLE} SET (autovacuum_enabled = off)")
        ttl = timedelta(hours=arguments.ttl_hours)
        say(f"filling {arguments.rows:,} keys")
        fill_seconds = fill(arguments.rows, ttl, arguments.expired, arguments.insert_batch)
        say(f"  filled in {fill_seconds:.0f} s ({arguments.rows / fill_seconds:,.0f} keys/s)")
        with connection.cursor() as cursor:
            sizes = sizes_postgresql(cursor) if postgresql else sizes_mysql(cursor)
        counters = counters_postgresql if postgresql else counters_mysql
        with connection.cursor() as cursor:
            before = 0 if postgresql else history_length(cursor)
            if postgresql:
                cursor.execute("SELECT pg_stat_force_next_flush()")
                time.sleep(1.5)
            start = counters(cursor)
        say("purging the expired keys")
        result = purge(arguments.batch_size)
        with connection.cursor() as cursor:
            if postgresql:
                cursor.execute("SELECT pg_stat_force_next_flush()")
                time.sleep(1.5)
            for name, value in counters(cursor).items():
                result.notes.append((f"{name} during the purge", f"{value - start[name]:,}"))
            if postgresql:
                after_purge_postgresql(cursor, result)
            else:
                after_purge_mysql(cursor, result, before)
    finally:
        connection.close()
        if not arguments.keep:
            server_command(f"DROP DATABASE IF EXISTS {BENCHMARK_DATABASE}")
    return report(arguments, version, sizes, result)


def report(arguments: argparse.Namespace, version: str, sizes: Sizes, result: Purge) -> str:
    rows, target = arguments.rows, arguments.extrapolate
    batch = f"{arguments.batch_size:,}" if arguments.batch_size else "the default (1,000)"
    version = version.split(",")[0]
    lines = [
        f"Measured by `python benchmarks/table_size.py --rows {rows}` on "
        f"{time.strftime('%Y-%m-%d')}: {version}, {os.cpu_count()} CPU cores; {rows:,} "
        f"completed keys, {arguments.expired:.0%} of them expired; extrapolated linearly to "
        f"{target:,} keys.",
        "",
        f"| part | bytes for {rows:,} keys | bytes per key | at {target:,} keys |",
        "| --- | ---: | ---: | ---: |",
    ]

    def line(name: str, size: int) -> str:
        return f"| {name} | {size:,} | {size / rows:,.1f} | {gigabytes(size / rows * target)} |"

    for name, size in sizes.parts.items():
        lines.append(line(name, size))
    index_total = sum(sizes.parts[name] for name in sizes.indexes)
    clustered = any(name.startswith("clustered") for name in sizes.parts)
    lines.append(line(f"**all {'secondary ' if clustered else ''}indexes**", index_total))
    lines.append(line("**total**", sizes.total))
    if sizes.density:
        densities = ", ".join(f"{name[6:]} {value:.0f} %" for name, value in sizes.density.items())
        lines += ["", f"Average leaf density of the indexes (pgstattuple): {densities}."]
    lines += [
        "",
        f"Purge (`purge_idempotency_keys`, batch size {batch}):",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| expired keys before the purge | {result.expired:,} |",
        f"| keys deleted | {result.deleted:,} |",
        f"| seconds | {result.seconds:.2f} |",
        f"| keys deleted per second | {result.rate:,.0f} |",
    ]
    lines += [f"| {name} | {value} |" for name, value in result.notes]
    return "\n".join(lines)


def gigabytes(size: float) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e8 else f"{size / 1e6:,.1f} MB"


def say(message: str) -> None:
    print(f"table_size: {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="keys to insert")
    parser.add_argument("--expired", type=float, default=0.1, help="fraction that has expired")
    parser.add_argument("--ttl-hours", type=float, default=24, help="the keys' TTL")
    parser.add_argument("--batch-size", type=int, default=None, help="passed to the purge")
    parser.add_argument("--insert-batch", type=int, default=5000, help="rows per bulk_create")
    parser.add_argument("--extrapolate", type=int, default=10**8, help="keys to extrapolate to")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    arguments = parser.parse_args()
    if not 0 < arguments.expired < 1:
        parser.error("--expired must be between 0 and 1")
    configure()
    print()
    print(run(arguments))


if __name__ == "__main__":
    main()
