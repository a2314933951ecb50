#!/usr/bin/env python3
"""Load benchmark: what idempotency costs over real HTTP, beside the other Django packages.

    .venv/bin/pip install -r requirements/benchmarks.txt    # once: gunicorn, matplotlib, ...
    apt-get install -y wrk                                   # once: the load generator
    .venv/bin/python benchmarks/load_benchmark.py            # the full run, about 8 minutes
    .venv/bin/python benchmarks/load_benchmark.py --quick    # a smoke test, under 2 minutes
    .venv/bin/python benchmarks/load_benchmark.py --database mariadb

What it does, in one go:

1. Creates its databases (``idempotency_bench`` and, for the scaling part,
   ``idempotency_bench_small`` and ``idempotency_bench_large``) on PostgreSQL
   (``postgres://postgres@127.0.0.1:5432/postgres``, or ``$BENCH_POSTGRES_URL``) or, with
   ``--database mariadb``, on MariaDB (``mysql://root@127.0.0.1:3306/test``, or
   ``$BENCH_MARIADB_URL``), and empties Redis database 15 (or the one ``$BENCH_REDIS_URL``
   names).
2. Installs each of the other Django idempotency packages from PyPI into its own virtualenv
   under ``benchmarks/.work/peers/`` (once; later runs reuse them) and records what happened.
3. Serves the testproject's ``bench`` app with gunicorn (``--workers`` sync workers per server):
   one server per set-up (django-idempotency with the database store, with the replay cache,
   with the Redis ``CacheStore``; one per other package; two for the scaling part).
4. Drives each scenario with wrk (``benchmarks/idempotency_keys.lua``) from its own process:
   (a) baseline, the same view without idempotency; (b) first executions, a fresh key per
   request; (c) replays of completed keys; (d) bursts of concurrent duplicates; (e) the same in
   the lease mode; (f) with the replay cache and with the cache store. Scenarios take turns in
   a rotating order over ``--rounds`` rounds, so machine drift hits all of them alike.
   Replay keys are completed through the server first; then every database's key table is
   vacuumed and analyzed, so all set-ups start their rounds from the same table state.
5. Counts executions server-side (the view inserts one ``bench_execution`` row per run) to
   see whether each package kept its promise: one execution per key.
6. Scaling: replays and first executions with ``--small-keys`` (1,000) and ``--large-keys``
   (1,000,000, filled with ``generate_series`` / MariaDB's sequence engine) keys in the table,
   and the bytes stored per key.
7. Prints the tables, writes them and a chart (``docs/img/performance-load.png``, or
   ``performance-load-mariadb.png``) into ``docs/performance.md``'s section for that database
   (unless ``--no-docs``), stops every server and drops its databases
   (unless ``--keep``), also on Ctrl-C or failure.

The load generator and the servers share this machine's cores: compare ratios between
scenarios of the same run, not absolute figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from docs_section import write_section  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parent.parent
TESTPROJECT = ROOT / "testproject"
WORK = ROOT / "benchmarks" / ".work"
LUA = ROOT / "benchmarks" / "idempotency_keys.lua"
DOCS = ROOT / "docs" / "performance.md"
# Each database has its own section and chart in the docs, so a MariaDB run never overwrites
# the PostgreSQL figures (or the other way round).
CHARTS = {
    "postgresql": ROOT / "docs" / "img" / "performance-load.png",
    "mariadb": ROOT / "docs" / "img" / "performance-load-mariadb.png",
}
MARKERS = {
    "postgresql": ("<!-- load-benchmark:start -->", "<!-- load-benchmark:end -->"),
    "mariadb": ("<!-- load-benchmark-mariadb:start -->", "<!-- load-benchmark-mariadb:end -->"),
}
DATABASE = "idempotency_bench"
SMALL_DATABASE, LARGE_DATABASE = "idempotency_bench_small", "idempotency_bench_large"
KEY_TABLE = "django_idempotency_idempotencykey"
EXECUTION_TABLE = "bench_execution"
BODY = b'{"sku": "BOOK-1", "quantity": 2, "customer": "c-4242"}'
FILL_TAG = 0x0F111
TEMPLATE_KEY = "0000ffff-0000-4000-8000-000000000000"

# The other packages compared in docs/comparison.md, as a user would install them. Each gets a
# virtualenv with the same Django, DRF and drivers as the main one.
PEERS = [
    "django-idempotency-key",
    "djangorestframework-idempotency-key",
    "drf-idem",
    "drf-idempotency",
    "drf-idempotencykey",
]
PEER_BASE_REQUIREMENTS = [
    "Django>=5.2,<6",
    "djangorestframework>=3.16",
    "gunicorn>=23.0",
    "psycopg[binary]>=3.2",
    "dj-database-url>=2.2",
    "django-redis>=6",
]

_children: list[subprocess.Popen[bytes]] = []
_children_lock = threading.Lock()


def say(message: str) -> None:
    print(f"load_benchmark: {message}", flush=True)


# -- Databases ---------------------------------------------------------------------------------


class Database:
    """The database server: create and drop the benchmark's databases, run a few queries."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "postgresql":
            self.url = os.environ.get(
                "BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"
            )
        else:
            self.url = os.environ.get("BENCH_MARIADB_URL", "mysql://root@127.0.0.1:3306/test")
        self.parts = urlsplit(self.url)

    def url_for(self, name: str) -> str:
        return self.parts._replace(path=f"/{name}").geturl()

    def connect(self, name: str | None = None) -> Any:
        parts = self.parts
        if self.kind == "postgresql":
            import psycopg

            return psycopg.connect(
                host=parts.hostname or "127.0.0.1",
                port=parts.port or 5432,
                user=parts.username or "postgres",
                password=parts.password or None,
                dbname=name or parts.path.lstrip("/") or "postgres",
                autocommit=True,
            )
        import MySQLdb

        connection = MySQLdb.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            user=parts.username or "root",
            password=parts.password or "",
            database=name or parts.path.lstrip("/") or "test",
        )
        connection.autocommit(True)
        return connection

    def execute(self, name: str | None, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        connection = self.connect(name)
        try:
            cursor = connection.cursor()
            cursor.execute(sql, params or None)
            rows = list(cursor.fetchall()) if cursor.description else []
            cursor.close()
            return rows
        finally:
            connection.close()

    def recreate(self, name: str) -> None:
        self.execute(None, f"DROP DATABASE IF EXISTS {name}")
        self.execute(None, f"CREATE DATABASE {name}")

    def drop(self, name: str) -> None:
        self.execute(None, f"DROP DATABASE IF EXISTS {name}")

    def version(self) -> str:
        (row,) = self.execute(None, "SELECT version()")
        return str(row[0]).split()[1 if self.kind == "postgresql" else 0].split("-")[0]

    def label(self) -> str:
        return f"{'PostgreSQL' if self.kind == 'postgresql' else 'MariaDB'} {self.version()}"

    def executions(self, name: str, tag: int) -> tuple[int, int]:
        """Rows the view inserted for the keys of run ``tag``: (executions, distinct keys)."""
        (row,) = self.execute(
            name,
            f"SELECT count(*), count(DISTINCT {self.quote('key')}) FROM {EXECUTION_TABLE} "
            f"WHERE {self.quote('key')} LIKE %s",
            (f"{tag:08x}-%",),
        )
        return int(row[0]), int(row[1])

    def quote(self, column: str) -> str:
        return f'"{column}"' if self.kind == "postgresql" else f"`{column}`"

    def now(self, name: str) -> Any:
        (row,) = self.execute(name, "SELECT CURRENT_TIMESTAMP(6)")
        return row[0]

    def fill(self, name: str, count: int) -> float:
        """Copy the completed template key ``count`` times, as fast as the server can."""
        k = self.quote("key")
        columns = (
            "scope, state, fingerprint, method, path, owner_token, response_status, "
            "response_headers, response_body, created_at, completed_at, expires_at, locked_until"
        )
        copied = ", ".join(f"t.{column.strip()}" for column in columns.split(","))
        started = time.perf_counter()
        if self.kind == "postgresql":
            self.execute(
                name,
                f"INSERT INTO {KEY_TABLE} ({k}, {columns}) "
                f"SELECT format('%%s-0000-4000-8000-%%s', %s::text, lpad(to_hex(g), 12, '0')), "
                f"{copied} FROM {KEY_TABLE} t, generate_series(0, %s) g WHERE t.{k} = %s",
                (f"{FILL_TAG:08x}", count - 1, TEMPLATE_KEY),
            )
        else:
            self.execute(
                name,
                f"INSERT INTO {KEY_TABLE} ({k}, {columns}) "
                f"SELECT CONCAT(%s, '-0000-4000-8000-', LPAD(LOWER(HEX(s.seq)), 12, '0')), "
                f"{copied} FROM {KEY_TABLE} t JOIN seq_0_to_{count - 1} s WHERE t.{k} = %s",
                (f"{FILL_TAG:08x}", TEMPLATE_KEY),
            )
        self.settle(name)
        return time.perf_counter() - started

    def settle(self, name: str) -> None:
        """Vacuum and analyze the key table, so every database starts its rounds alike."""
        if self.kind == "postgresql":
            self.execute(name, f"VACUUM ANALYZE {KEY_TABLE}")
        else:
            self.execute(name, f"ANALYZE TABLE {KEY_TABLE}")

    def forget_since(self, name: str, since: Any) -> None:
        """Delete the keys a run added, so the table keeps the size it was filled to."""
        self.execute(name, f"DELETE FROM {KEY_TABLE} WHERE created_at > %s", (since,))

    def storage(self, name: str) -> dict[str, float]:
        """Bytes per key: the table with its indexes, and the row alone."""
        if self.kind == "postgresql":
            ((total, heap, rows, row_bytes, body),) = self.execute(
                name,
                f"SELECT pg_total_relation_size('{KEY_TABLE}'), pg_relation_size('{KEY_TABLE}'),"
                f" count(*), avg(pg_column_size(t.*)), avg(octet_length(response_body)) "
                f"FROM {KEY_TABLE} t",
            )
        else:
            self.execute(name, f"ANALYZE TABLE {KEY_TABLE}")
            ((heap, index),) = self.execute(
                None,
                "SELECT data_length, index_length FROM information_schema.tables "
                "WHERE table_schema = %s AND table_name = %s",
                (name, KEY_TABLE),
            )
            total = int(heap) + int(index)
            ((rows, row_bytes, body),) = self.execute(
                name,
                f"SELECT count(*), avg(length(scope) + length({self.quote('key')}) + "
                "length(state) + length(fingerprint) + length(method) + length(path) + "
                "length(owner_token) + 2 + length(response_headers) + length(response_body) + "
                f"4 * 7), avg(length(response_body)) FROM {KEY_TABLE}",
            )
        rows = int(rows)
        return {
            "rows": rows,
            "total_per_key": int(total) / rows,
            "heap_per_key": int(heap) / rows,
            "row_bytes": float(row_bytes),
            "body_bytes": float(body),
        }


# -- Virtualenvs for the other packages --------------------------------------------------------


@dataclass
class Peer:
    name: str
    python: Path | None = None
    version: str = ""
    problem: str = ""  # why it is not measured, or what went wrong


def prepare_peer(name: str, database: Database) -> Peer:
    venv = WORK / "peers" / name
    requirements = [*PEER_BASE_REQUIREMENTS, name]
    if database.kind == "mariadb":
        requirements.append("mysqlclient>=2.2")
    marker = venv / "bench-requirements.txt"
    python = venv / "bin" / "python"
    log = WORK / "logs" / f"pip-{name}.log"
    if not (marker.exists() and marker.read_text() == "\n".join(requirements) and python.exists()):
        say(f"installing {name} into {venv.relative_to(ROOT)}")
        with log.open("w") as output:
            created = subprocess.run(
                [sys.executable, "-m", "venv", "--clear", str(venv)], stdout=output, stderr=output
            )
            installed = created.returncode == 0 and (
                subprocess.run(
                    [str(python), "-m", "pip", "install", "--quiet", *requirements],
                    stdout=output,
                    stderr=output,
                ).returncode
                == 0
            )
        if not installed:
            last = [line for line in log.read_text().splitlines() if line.strip()][-1:]
            return Peer(name, problem=f"pip install failed: {' '.join(last)[:200]}")
        marker.write_text("\n".join(requirements))
    version = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return Peer(name, python, version)


def package_versions(python: Path) -> str:
    code = (
        "import importlib.metadata as m; "
        "print(' '.join(f'{n} {m.version(n)}' for n in ('Django', 'djangorestframework')))"
    )
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


# -- Servers -----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel sends it SIGTERM when this script's process
    # ends, even when this script is killed and its own cleanup never runs.
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_child(command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a process in its own process group, remembered so that it is always stopped."""
    with _children_lock:
        process = subprocess.Popen(
            command, start_new_session=True, preexec_fn=_die_with_parent, **kwargs
        )
        _children.append(process)
    return process


def stop_child(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the group this script created for it
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with _children_lock:
        if process in _children:
            _children.remove(process)


def stop_all_children() -> None:
    for process in list(_children):
        stop_child(process)


@dataclass
class Server:
    name: str
    port: int
    python: Path
    settings: str
    database: str
    environment: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def run(self, arguments: list[str], database: Database, **kwargs: Any) -> Any:
        return subprocess.run(
            [str(self.python), *arguments],
            cwd=TESTPROJECT,
            env=self.env(database),
            **kwargs,
        )

    def env(self, database: Database) -> dict[str, str]:
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": self.settings,
            "DATABASE_URL": database.url_for(self.database),
            "REDIS_URL": redis_url(),
            "BENCH_CACHE_PREFIX": self.name,
            "PYTHONDONTWRITEBYTECODE": "1",
            **self.environment,
        }

    def migrate(self, database: Database) -> str:
        log = WORK / "logs" / f"migrate-{self.name}.log"
        with log.open("w") as output:
            result = self.run(
                ["manage.py", "migrate", "--no-input"], database, stdout=output, stderr=output
            )
        if result.returncode:
            lines = [line for line in log.read_text().splitlines() if line.strip()]
            return f"migrate failed: {lines[-1][:200] if lines else result.returncode}"
        return ""

    def start(self, database: Database, workers: int) -> None:
        log = WORK / "logs" / f"gunicorn-{self.name}.log"
        gunicorn = self.python.parent / "gunicorn"
        self.process = start_child(
            [
                str(gunicorn),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(workers),
                "--worker-class",
                "sync",
                "--preload",
                "--log-level",
                "warning",
                "--timeout",
                "60",
                "testproject.wsgi:application",
            ],
            cwd=TESTPROJECT,
            env=self.env(database),
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def wait_until_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"gunicorn for {self.name} exited; see .work/logs")
            try:
                status, _, _ = request(self.port, "GET", "/bench/ping/")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn for {self.name} did not answer in {timeout:.0f} s")


def redis_url() -> str:
    return os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")


def flush_redis() -> str:
    import redis

    client = redis.Redis.from_url(redis_url())
    client.flushdb()  # this database (15 unless BENCH_REDIS_URL names another) is the benchmark's
    return str(client.info("server")["redis_version"])


def redis_database() -> int:
    return int(urlsplit(redis_url()).path.lstrip("/") or 0)


def request(
    port: int, method: str, path: str, key: str | None = None
) -> tuple[int, bytes, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        connection.request(method, path, body=BODY if method == "POST" else None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def replay_key(tag: int, index: int) -> str:
    return f"{tag:08x}-0000-4000-8000-{index:012x}"


# -- Scenarios ---------------------------------------------------------------------------------


@dataclass
class Run:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    ok: int
    conflict: int
    other: int
    queries: int
    counted: int
    socket_errors: int
    executions: int = 0
    extra_executions: int = 0
    keys: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class Scenario:
    letter: str
    label: str
    setup: str
    server: Server
    path: str
    mode: str  # fresh, replay, burst
    group: str  # ours, peer, scaling
    replay_tag: int = 0
    replay_keys: int = 0
    runs: list[Run] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    ok_ratios: list[float] = field(default_factory=list)
    problem: str = ""

    @property
    def name(self) -> str:
        return f"{self.setup}: {self.label}"

    def total(self, attribute: str) -> int:
        return sum(getattr(run, attribute) for run in self.runs)

    @property
    def rate(self) -> float:
        seconds = sum(run.seconds for run in self.runs)
        return self.total("requests") / seconds if seconds else 0.0

    @property
    def ok_rate(self) -> float:
        """Successful (2xx) answers per second: what (b) and (c) are compared on."""
        seconds = sum(run.seconds for run in self.runs)
        return self.total("ok") / seconds if seconds else 0.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(run.p50_ms for run in self.runs)

    @property
    def p99_ms(self) -> float:
        return statistics.median(run.p99_ms for run in self.runs)

    @property
    def queries_per_request(self) -> float:
        counted = self.total("counted")
        return self.total("queries") / counted if counted else float("nan")


class Benchmark:
    def __init__(self, arguments: argparse.Namespace) -> None:
        self.arguments = arguments
        self.database = Database(arguments.database)
        self.tag = 0x100
        self.wrk: subprocess.Popen[bytes] | None = None

    def next_tag(self) -> int:
        self.tag += 1
        return self.tag

    def wrk_run(self, scenario: Scenario, duration: int, tag: int) -> Run:
        arguments = self.arguments
        command = [
            "wrk",
            f"-t{arguments.threads}",
            f"-c{arguments.connections}",
            f"-d{duration}s",
            "--timeout",
            "30s",
            "-s",
            str(LUA),
            f"http://127.0.0.1:{scenario.server.port}{scenario.path}",
            "--",
            scenario.mode,
            str(scenario.replay_tag if scenario.mode == "replay" else tag),
            str(scenario.replay_keys or 1),
            str(arguments.connections // arguments.threads),
        ]
        self.wrk = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = self.wrk.communicate()
        self.wrk = None
        lines = [line for line in out.decode().splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"wrk printed no result for {scenario.name}: {err.decode()[:500]}")
        data = json.loads(lines[-1])
        if err.strip():
            (WORK / "logs" / "wrk-stderr.log").open("a").write(
                f"--- {scenario.name}\n{err.decode()}"
            )
        return Run(
            requests=data["requests"],
            seconds=data["seconds"],
            p50_ms=data["p50_us"] / 1000,
            p99_ms=data["p99_us"] / 1000,
            ok=data["ok"],
            conflict=data["conflict"],
            other=data["other"],
            queries=data["queries"],
            counted=data["counted"],
            socket_errors=data["socket_errors"],
        )

    def measure(self, scenario: Scenario, duration: int) -> Run:
        database = self.database
        name = scenario.server.database
        tag = self.next_tag()
        counted_tag = scenario.replay_tag if scenario.mode == "replay" else tag
        before, _ = database.executions(name, counted_tag)
        since = database.now(name) if scenario.group == "scaling" else None
        run = self.wrk_run(scenario, duration, tag)
        after, distinct = database.executions(name, counted_tag)
        run.executions = after - before
        if scenario.mode == "replay":
            run.extra_executions = run.executions  # every key had run before the replays
            run.keys = scenario.replay_keys
        else:
            run.extra_executions = after - distinct
            run.keys = distinct
        if since is not None:
            database.forget_since(name, since)
        return run

    def prefill(self, scenario: Scenario) -> None:
        """Complete ``replay_keys`` keys through the server, so that the run replays them."""
        server, tag = scenario.server, scenario.replay_tag

        def send(index: int) -> int:
            for _ in range(50):  # a package's own lock may turn a few away (409, 423)
                status, _, _ = request(server.port, "POST", scenario.path, replay_key(tag, index))
                if status not in (409, 423):
                    break
                time.sleep(0.05)
            return status

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(send, range(scenario.replay_keys)))
        bad = [status for status in statuses if not 200 <= status < 300]
        if bad:
            raise RuntimeError(f"{scenario.name}: prefill answered {bad[0]} ({len(bad)} times)")


# -- The run -----------------------------------------------------------------------------------


def build(benchmark: Benchmark, peers: list[Peer]) -> tuple[list[Server], list[Scenario]]:
    arguments = benchmark.arguments
    main_python = Path(sys.executable)
    port = arguments.port
    ours = Server("ours", port, main_python, "bench.settings", DATABASE)
    replay_cache = Server(
        "ours-replay-cache",
        port + 1,
        main_python,
        "bench.settings",
        DATABASE,
        {"IDEMPOTENCY_REPLAY_CACHE": "default"},
    )
    cache_store = Server(
        "ours-cache-store",
        port + 2,
        main_python,
        "bench.settings",
        DATABASE,
        {"IDEMPOTENCY_STORE": "django_idempotency.stores.CacheStore"},
    )
    servers = [ours, replay_cache, cache_store]
    replay_keys = arguments.replay_keys
    scenarios = [
        Scenario(
            "a",
            "baseline, no idempotency",
            "no idempotency",
            ours,
            "/bench/baseline/",
            "fresh",
            "ours",
        ),
        Scenario(
            "b", "first executions", "django-idempotency", ours, "/bench/atomic/", "fresh", "ours"
        ),
        Scenario(
            "c",
            "replays",
            "django-idempotency",
            ours,
            "/bench/atomic/",
            "replay",
            "ours",
            replay_keys=replay_keys,
        ),
        Scenario(
            "d",
            "concurrent duplicates",
            "django-idempotency",
            ours,
            "/bench/atomic/",
            "burst",
            "ours",
        ),
        Scenario(
            "e",
            "first executions",
            "django-idempotency, lease mode",
            ours,
            "/bench/lease/",
            "fresh",
            "ours",
        ),
        Scenario(
            "e",
            "replays",
            "django-idempotency, lease mode",
            ours,
            "/bench/lease/",
            "replay",
            "ours",
            replay_keys=replay_keys,
        ),
        Scenario(
            "e",
            "concurrent duplicates",
            "django-idempotency, lease mode",
            ours,
            "/bench/lease/",
            "burst",
            "ours",
        ),
        Scenario(
            "f",
            "first executions",
            "django-idempotency + replay cache",
            replay_cache,
            "/bench/atomic/",
            "fresh",
            "ours",
        ),
        Scenario(
            "f",
            "replays",
            "django-idempotency + replay cache",
            replay_cache,
            "/bench/atomic/",
            "replay",
            "ours",
            replay_keys=replay_keys,
        ),
        Scenario(
            "f",
            "first executions",
            "django-idempotency, CacheStore (Redis)",
            cache_store,
            "/bench/atomic/",
            "fresh",
            "ours",
        ),
        Scenario(
            "f",
            "replays",
            "django-idempotency, CacheStore (Redis)",
            cache_store,
            "/bench/atomic/",
            "replay",
            "ours",
            replay_keys=replay_keys,
        ),
        Scenario(
            "f",
            "concurrent duplicates",
            "django-idempotency, CacheStore (Redis)",
            cache_store,
            "/bench/atomic/",
            "burst",
            "ours",
        ),
    ]
    for offset, peer in enumerate(peers):
        if peer.python is None:
            continue
        server = Server(
            peer.name,
            port + 10 + offset,
            peer.python,
            "bench.settings_peer",
            DATABASE,
            {"BENCH_PEER": peer.name},
        )
        servers.append(server)
        for letter, label, mode in (
            ("b", "first executions", "fresh"),
            ("c", "replays", "replay"),
            ("d", "concurrent duplicates", "burst"),
        ):
            scenarios.append(
                Scenario(
                    letter,
                    label,
                    peer.name,
                    server,
                    "/bench/peer/",
                    mode,
                    "peer",
                    replay_keys=replay_keys if mode == "replay" else 0,
                )
            )
    if arguments.scaling:
        for offset, (database, keys) in enumerate(
            ((SMALL_DATABASE, arguments.small_keys), (LARGE_DATABASE, arguments.large_keys))
        ):
            server = Server(
                f"ours-{keys}-keys", port + 20 + offset, main_python, "bench.settings", database
            )
            servers.append(server)
            setup = f"{keys:,} keys in the table"
            scenarios.append(
                Scenario(
                    "2", "first executions", setup, server, "/bench/atomic/", "fresh", "scaling"
                )
            )
            scenarios.append(
                Scenario(
                    "2",
                    "replays",
                    setup,
                    server,
                    "/bench/atomic/",
                    "replay",
                    "scaling",
                    replay_tag=FILL_TAG,
                    replay_keys=keys,
                )
            )
    return servers, scenarios


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    for log in (WORK / "logs").glob("*.log"):
        log.unlink()
    benchmark = Benchmark(arguments)
    database = benchmark.database
    started = time.perf_counter()

    peers: list[Peer] = []
    if arguments.peers:
        with concurrent.futures.ThreadPoolExecutor(len(PEERS)) as pool:
            peers = list(pool.map(lambda name: prepare_peer(name, database), PEERS))
        for peer in peers:
            say(f"{peer.name} {peer.version}: {peer.problem or 'installed'}")

    say(f"creating databases on {database.label()}; emptying Redis database {redis_database()}")
    redis_version = flush_redis()
    databases = [DATABASE] + ([SMALL_DATABASE, LARGE_DATABASE] if arguments.scaling else [])
    for name in databases:
        database.recreate(name)
    servers, scenarios = build(benchmark, peers)
    try:
        migrated: dict[tuple[str, str, str, str], str] = {}
        for server in servers:
            what = (
                str(server.python),
                server.settings,
                server.database,
                server.environment.get("BENCH_PEER", ""),
            )
            if what not in migrated:
                migrated[what] = server.migrate(database)
            if migrated[what]:
                mark_broken(server, scenarios, peers, migrated[what])
        servers = [s for s in servers if not any(sc.problem for sc in scenarios if sc.server is s)]
        say(f"starting {len(servers)} gunicorn servers, {arguments.workers} workers each")
        for server in servers:
            server.start(database, arguments.workers)
        for server in servers:
            try:
                server.wait_until_up()
            except RuntimeError as error:
                mark_broken(server, scenarios, peers, str(error))
        check_peers(benchmark, scenarios, peers)
        scenarios = [scenario for scenario in scenarios if not scenario.problem]

        storage: dict[str, dict[str, float]] = {}
        if arguments.scaling:
            for server in servers:
                if server.database not in (SMALL_DATABASE, LARGE_DATABASE):
                    continue
                status, body, _ = request(server.port, "POST", "/bench/atomic/", TEMPLATE_KEY)
                if status != 201:
                    raise RuntimeError(f"template request answered {status}: {body[:200]!r}")
                keys = next(
                    s.replay_keys for s in scenarios if s.server is server and s.replay_keys
                )
                seconds = database.fill(server.database, keys)
                say(f"filled {server.database} with {keys:,} keys in {seconds:.1f} s")
                storage[server.name] = database.storage(server.database)
        for scenario in scenarios:
            if scenario.mode == "replay" and scenario.group != "scaling":
                scenario.replay_tag = benchmark.next_tag()
                benchmark.prefill(scenario)
        # The scaling databases were vacuumed and analyzed once filled; the main one starts
        # the rounds in the same state (its replay keys were completed through the server: a
        # claim and its update, two row versions per key, as in production).
        database.settle(DATABASE)
        say(f"{len(scenarios)} scenarios ready after {time.perf_counter() - started:.0f} s")

        baseline = scenarios[0]
        rounds = arguments.rounds + (1 if arguments.warmup else 0)
        for number in range(rounds):
            warmup = arguments.warmup and number == 0
            shift = number * 7 % len(scenarios)
            order = scenarios[shift:] + scenarios[:shift]
            results = {}
            for scenario in order:
                run_ = benchmark.measure(
                    scenario, arguments.warmup if warmup else arguments.duration
                )
                if not warmup:
                    scenario.runs.append(run_)
                results[scenario.name] = run_
            if warmup:
                say("warm-up round done")
                continue
            for scenario in scenarios:
                base = results[baseline.name].rate
                scenario.ratios.append(results[scenario.name].rate / base)
                scenario.ok_ratios.append(
                    results[scenario.name].ok / results[scenario.name].seconds / base
                )
            say(
                f"round {number + (0 if arguments.warmup else 1)}/{arguments.rounds}: baseline "
                f"{results[baseline.name].rate:,.0f}/s, "
                + ", ".join(f"{s.letter} {s.ratios[-1]:.2f}x" for s in scenarios[1:7])
            )
        if arguments.scaling:
            for server in servers:
                if server.name in storage:
                    storage[server.name]["after"] = database.storage(server.database)["rows"]
        return {
            "scenarios": scenarios,
            "peers": peers,
            "storage": storage,
            "database": database.label(),
            "redis": redis_version,
            "versions": package_versions(Path(sys.executable)),
            "seconds": time.perf_counter() - started,
        }
    finally:
        if benchmark.wrk is not None and benchmark.wrk.poll() is None:
            benchmark.wrk.kill()
        say(f"stopping {len(_children)} servers")
        stop_all_children()
        if not arguments.keep:
            for name in databases:
                try:
                    database.drop(name)
                except Exception as error:  # best effort while unwinding
                    say(f"could not drop {name}: {error}")
            with contextlib.suppress(Exception):  # best effort while unwinding
                flush_redis()


def mark_broken(server: Server, scenarios: list[Scenario], peers: list[Peer], problem: str) -> None:
    say(f"{server.name}: {problem}")
    for scenario in scenarios:
        if scenario.server is server:
            scenario.problem = problem
    for peer in peers:
        if peer.name == server.name:
            peer.problem = problem
    if server.process is not None:
        stop_child(server.process)


def check_peers(benchmark: Benchmark, scenarios: list[Scenario], peers: list[Peer]) -> None:
    """One request and one retry through each other package, before any load."""
    database = benchmark.database
    for peer in peers:
        scenario = next((s for s in scenarios if s.setup == peer.name and not s.problem), None)
        if scenario is None:
            continue
        tag = benchmark.next_tag()
        key = f"{tag:08x}-0001-4000-8000-000000000000"
        first = request(scenario.server.port, "POST", "/bench/peer/", key)
        retry = request(scenario.server.port, "POST", "/bench/peer/", key)
        executions, _ = database.executions(DATABASE, tag)
        if not 200 <= first[0] < 300:
            mark_broken(
                scenario.server,
                scenarios,
                peers,
                f"first request answered {first[0]}: {first[1][:160].decode(errors='replace')}",
            )
            continue
        peer.problem = f"smoke test: first {first[0]}, retry {retry[0]}, view ran {executions}x"


# -- Reporting ---------------------------------------------------------------------------------


def milliseconds(value: float) -> str:
    return f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


def outcome(scenario: Scenario) -> str:
    ok, conflict, other = (scenario.total(name) for name in ("ok", "conflict", "other"))
    parts = [f"{ok:,} 2xx"]
    if conflict:
        parts.append(f"{conflict:,} 409")
    if other:
        parts.append(f"{other:,} other")
    errors = scenario.total("socket_errors")
    if errors:
        parts.append(f"{errors:,} socket errors")
    return ", ".join(parts)


def ratio_text(scenario: Scenario, successful: bool = False) -> str:
    ratios = scenario.ok_ratios if successful else scenario.ratios
    if len(ratios) > 1:
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
    return f"{ratios[0]:.2f}x"


def report(arguments: argparse.Namespace, result: dict[str, Any]) -> str:
    scenarios: list[Scenario] = result["scenarios"]
    peers: list[Peer] = result["peers"]
    main = [s for s in scenarios if s.group != "scaling"]
    scaling = [s for s in scenarios if s.group == "scaling"]
    lines = [
        f"Measured by `python benchmarks/load_benchmark.py{' --quick' if arguments.quick else ''}"
        f"{' --database mariadb' if arguments.database == 'mariadb' else ''}` on "
        f"{time.strftime('%Y-%m-%d')}: {result['database']} and Redis {result['redis']} on this "
        f"machine, {os.cpu_count()} CPU cores shared by the servers, the databases and wrk; "
        f"Python {sys.version.split()[0]}, {result['versions']}. Each set-up is served by "
        f"gunicorn with {arguments.workers} sync workers and persistent database connections; "
        f"wrk sends a {len(BODY)}-byte JSON POST from {arguments.threads} threads over "
        f"{arguments.connections} connections. {arguments.rounds} interleaved rounds of "
        f"{arguments.duration} s per scenario; p50 and p99 are the medians over the rounds; the "
        f"ratio is the median of the rounds' ratios to the baseline (range in brackets). "
        f"The whole run took {result['seconds'] / 60:.1f} minutes.",
        "",
        "| | scenario | set-up | requests/s | p50 | p99 | SQL queries per request | "
        "throughput vs baseline | answers | extra executions |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for scenario in main:
        lines.append(
            f"| {scenario.letter} | {scenario.label} | {scenario.setup} | {scenario.rate:,.0f} | "
            f"{milliseconds(scenario.p50_ms)} | {milliseconds(scenario.p99_ms)} | "
            f"{scenario.queries_per_request:.2f} | {ratio_text(scenario)} | {outcome(scenario)} | "
            f"{scenario.total('extra_executions'):,} |"
        )
    lines += [
        "",
        "*Extra executions* are counted in the database: rows the view inserted beyond one per "
        "key (first executions and bursts), or any row at all for keys that had already "
        "completed (replays).",
    ]
    if scaling:
        storage = result["storage"]
        lines += [
            "",
            "#### Scaling with the size of the table",
            "",
            "| keys in the table | scenario | requests/s | p50 | p99 | SQL queries per request | "
            "throughput vs baseline | bytes per key (table + indexes) | bytes per row |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for scenario in scaling:
            stored = storage[scenario.server.name]
            lines.append(
                f"| {stored['rows']:,} | {scenario.label} | {scenario.rate:,.0f} | "
                f"{milliseconds(scenario.p50_ms)} | {milliseconds(scenario.p99_ms)} | "
                f"{scenario.queries_per_request:.2f} | {ratio_text(scenario)} | "
                f"{stored['total_per_key']:,.0f} | {stored['row_bytes']:,.0f} |"
            )
        small = [s for s in scaling if s.server.database == SMALL_DATABASE]
        large = [s for s in scaling if s.server.database == LARGE_DATABASE]
        growth = []
        for a, b in zip(small, large, strict=True):
            growth.append(f"{a.label} p50 {b.p50_ms / a.p50_ms:.2f}x")
        body = next(iter(storage.values()))["body_bytes"]
        lines += [
            "",
            f"From {small[0].setup} to {large[0].setup}: " + ", ".join(growth) + ". "
            f"The stored response body is {body:,.0f} bytes; each run's own first executions "
            "are deleted after it, so the tables keep their size.",
        ]
    lines += [
        "",
        "#### The other packages, measured in the same run",
        "",
        "| package | version | (b) first executions: 2xx/s vs baseline | "
        "(c) replays: 2xx/s vs baseline | "
        "(d) duplicates: extra executions | extra executions, all scenarios | "
        "one execution per key? | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    ours = {s.label: s for s in main if s.setup == "django-idempotency"}
    rows = [("django-idempotency (this package)", "", ours)]
    for peer in peers:
        rows.append((peer.name, peer.version, {s.label: s for s in main if s.setup == peer.name}))
    notes = {peer.name: peer.problem for peer in peers}
    for name, version, mine in rows:
        if not mine:
            lines.append(
                f"| {name} | {version or '-'} | - | - | - | - | not measured | "
                f"{notes.get(name, '')} |"
            )
            continue
        extra = sum(s.total("extra_executions") for s in mine.values())
        lines.append(
            f"| {name} | {version or '-'} | {ratio_text(mine['first executions'], True)} | "
            f"{ratio_text(mine['replays'], True)} | "
            f"{mine['concurrent duplicates'].total('extra_executions'):,} | {extra:,} | "
            f"{'yes' if extra == 0 else 'no'} | {notes.get(name, '')} |"
        )
    lines += [
        "",
        f"![Throughput of each scenario relative to the baseline, and its p50 and p99 "
        f"latency](img/{CHARTS[arguments.database].name})",
    ]
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios: list[Scenario] = list(result["scenarios"])
    names = [
        f"{s.letter}  {s.setup}: {s.label}" if s.group != "scaling" else f"{s.setup}: {s.label}"
        for s in scenarios
    ]
    colours = {"ours": "#2a6f97", "peer": "#c97b2a", "scaling": "#5b8c5a"}
    figure, (left, right) = plt.subplots(
        1,
        2,
        figsize=(13, 0.34 * len(scenarios) + 1.6),
        sharey=True,
        gridspec_kw={"width_ratios": [1, 1]},
    )
    positions = range(len(scenarios))[::-1]
    ratios = [statistics.median(s.ratios) for s in scenarios]
    left.barh(positions, ratios, color=[colours[s.group] for s in scenarios])
    left.axvline(1.0, color="black", linewidth=0.8)
    left.set_yticks(list(positions), names, fontsize=8)
    left.set_xlabel("throughput relative to the baseline (a)")
    for position, ratio in zip(positions, ratios, strict=True):
        left.text(ratio, position, f" {ratio:.2f}x", va="center", fontsize=7)
    left.set_xlim(0, max(ratios) * 1.18)
    p50 = [s.p50_ms for s in scenarios]
    p99 = [s.p99_ms for s in scenarios]
    right.barh(positions, p99, color="#bbbbbb", label="p99")
    right.barh(positions, p50, color=[colours[s.group] for s in scenarios], label="p50")
    right.set_xlabel("latency (ms): p50 (colour) and p99 (grey)")
    right.set_xscale("log")
    figure.suptitle(
        f"django-idempotency under load: {result['database']}, gunicorn, wrk, "
        f"{time.strftime('%Y-%m-%d')}",
        fontsize=10,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_docs(figures: str, database: str) -> None:
    start, end = MARKERS[database]
    write_section(DOCS, start, end, figures)


def targets(result: dict[str, Any]) -> list[str]:
    scenarios: list[Scenario] = result["scenarios"]
    by = {(s.setup, s.label): s for s in scenarios}

    def ratio(setup: str, label: str) -> float:
        return statistics.median(by[(setup, label)].ok_ratios)

    lines = [
        f"first execution {ratio('django-idempotency', 'first executions'):.2f}x baseline "
        "(target >= 0.80)",
        f"replay {ratio('django-idempotency', 'replays'):.2f}x baseline (target >= 1.0)",
    ]
    scaling = [s for s in scenarios if s.group == "scaling" and s.label == "replays"]
    if len(scaling) == 2:
        lines.append(
            f"replay p50 large/small {scaling[1].p50_ms / scaling[0].p50_ms:.2f}x (target <= 1.25)"
        )
    for label in ("first executions", "replays"):
        mine = ratio("django-idempotency", label)
        others = {
            s.setup: statistics.median(s.ok_ratios)
            for s in scenarios
            if s.group == "peer" and s.label == label
        }
        if not others:
            lines.append(f"{label}: no other package was measured")
            continue
        beaten = [name for name, value in others.items() if value >= mine]
        lines.append(
            f"{label}: faster than every other package: "
            f"{'yes' if not beaten else 'no, not ' + ', '.join(beaten)}"
        )
    clean = [
        s.setup
        for s in scenarios
        if s.label == "concurrent duplicates" and s.total("extra_executions") == 0
    ]
    lines.append(f"zero duplicate executions in (d): {', '.join(clean) or 'none'}")
    return lines


def prepare(script: str, arguments: argparse.Namespace, **defaults: int) -> None:
    """Fill the timing options left unset (``--quick``: short, one round) and ``defaults``,
    check that wrk is installed, and make SIGTERM unwind like Ctrl-C, through the ``finally``
    that stops every server."""
    quick = arguments.quick
    defaults = {
        "duration": 1 if quick else 4,
        "rounds": 1 if quick else 3,
        "warmup": 0 if quick else 1,
        **defaults,
    }
    for name, value in defaults.items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, value)
    if subprocess.run(["which", "wrk"], capture_output=True).returncode:
        raise SystemExit(f"{script}: wrk is missing: apt-get install -y wrk")
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 1 s per scenario, one round, 10,000 large keys",
    )
    parser.add_argument("--database", choices=["postgresql", "mariadb"], default="postgresql")
    parser.add_argument("--duration", type=int, help="seconds per scenario and round (4)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds measured (3)")
    parser.add_argument(
        "--warmup",
        type=int,
        help="seconds per scenario in a warm-up round that is not counted (1; 0 for none)",
    )
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers per server")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="wrk connections; connections / threads is the burst size of (d)",
    )
    parser.add_argument("--replay-keys", type=int, help="keys completed before (c) (200)")
    parser.add_argument("--small-keys", type=int, default=1000)
    parser.add_argument("--large-keys", type=int, help="keys in the large table (1,000,000)")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false")
    parser.add_argument(
        "--no-peers", dest="peers", action="store_false", help="skip the other packages"
    )
    parser.add_argument("--port", type=int, default=8310, help="first port of the servers")
    parser.add_argument("--no-docs", action="store_true", help=f"do not rewrite {DOCS.name}")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark databases")
    arguments = parser.parse_args()
    quick = arguments.quick
    prepare(
        "load_benchmark",
        arguments,
        replay_keys=50 if quick else 200,
        large_keys=10_000 if quick else 1_000_000,
    )
    result = run(arguments)
    figures = report(arguments, result)
    print()
    print(figures)
    print()
    for line in targets(result):
        say(line)
    if not arguments.no_docs:
        chart_path = CHARTS[arguments.database]
        chart(result, chart_path)
        write_docs(figures, arguments.database)
        say(f"figures written into {DOCS.relative_to(ROOT)} and {chart_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
