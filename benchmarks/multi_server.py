#!/usr/bin/env python3
"""Many app servers, one database: the retry storm across three gunicorns behind HAProxy (#16).

    .venv/bin/python benchmarks/multi_server.py                  # all three stores, ~2 minutes
    .venv/bin/python benchmarks/multi_server.py --store postgresql --no-kill
    .venv/bin/python benchmarks/multi_server.py --docs           # ...and update docs/scaling.md

For each store (PostgreSQL, MariaDB, the Redis ``CacheStore``), in a process of its own:

1. Creates the database ``test_idempotency_ms_<store>`` (dropped at the end) on the suite's
   PostgreSQL or MariaDB (``scripts/services.sh``; ``$MULTI_POSTGRES_URL``,
   ``$MULTI_MARIADB_URL``), or, for the cache store, uses Redis database 12
   (``$MULTI_REDIS_URL``) under a key prefix of its own, deleted at the end.
2. Starts three gunicorn instances on their own ports, two sync workers each, serving
   ``tests/reliability_views.py`` with the same settings, and HAProxy (installed from Debian
   when missing) balancing round robin over them with no stickiness, so that the retries of a
   key land on other instances. HAProxy names the instance of each answer (``X-Instance``).
3. Sends the 32-client retry storm of ``tests/test_retry_storm.py`` through HAProxy: 500
   operations (half atomic mode, half lease mode on a database; lease mode on the cache
   store), each retried 1 to 10 times within 0.6 s, the view sleeping up to 0.15 s.
4. Unless ``--no-kill``: a second storm in which one instance (its master and workers) is
   killed with ``SIGKILL`` 40 % into the storm, then every operation retried until it has a
   final answer, as a client would. On a database this storm uses the atomic mode only: a
   lease-mode view killed after its effect and before its completion runs again on a retry
   (docs/modes.md), whatever the topology.
5. Counts the effects of every operation (``Charge`` rows, or the Redis counters of the cache
   store's view) and prints, per storm: requests/s, p50/p99 latency, 5xx answers, dropped
   connections, effects per key, and the retries answered by another instance than their
   operation's first attempt.

Exits non-zero when a storm without a kill broke the rule (one effect per key, no 5xx, no
dropped connection), or when the storm with a kill left a key with no effect or without a
final ``201``, an atomic-mode key with two effects, or a ``5xx`` that an instance (not
HAProxy, for a request the kill cut off) answered.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from docs_section import write_section  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "scaling.md"
MARKERS = ("<!-- multi-server:start -->", "<!-- multi-server:end -->")
STORES = {
    "postgresql": os.environ.get(
        "MULTI_POSTGRES_URL", "postgres://idempotency:idempotency@127.0.0.1:5432/idempotency"
    ),
    "mariadb": os.environ.get(
        "MULTI_MARIADB_URL", "mysql://idempotency:idempotency@127.0.0.1:3306/idempotency"
    ),
    "cache": os.environ.get("MULTI_REDIS_URL", "redis://127.0.0.1:6379/12"),
}
NAMES = {"postgresql": "PostgreSQL", "mariadb": "MariaDB", "cache": "CacheStore (Redis)"}
RESULT = "MULTI-SERVER-RESULT "


def ensure_haproxy() -> str:
    found = shutil.which("haproxy")
    if found is None and Path("/usr/sbin/haproxy").exists():
        found = "/usr/sbin/haproxy"
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("haproxy is not installed: apt-get install -y haproxy (as root)")
    print("installing haproxy from Debian", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "haproxy"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return shutil.which("haproxy") or "/usr/sbin/haproxy"


# -- One store, in a process of its own (Django is set up once per process) ------------------


def _setup_django(store: str, url: str) -> dict[str, str]:
    """Configure this process like the instances; return the instances' environment."""
    sys.path.insert(0, str(ROOT))
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.reliability_settings"
    env: dict[str, str] = {}
    if store == "cache":
        prefix = f"idempotency-multi-{uuid.uuid4().hex[:12]}"
        env = {
            "RELIABILITY_STORE": "cache",
            "REDIS_URL": url,
            "RELIABILITY_KEY_PREFIX": prefix,
            # A killed instance's leases free their keys after 2 s (30 s by default).
            "RELIABILITY_LOCK_TTL": "2",
        }
    else:
        env = {"RELIABILITY_DATABASE_URL": url}
    os.environ.update(env)
    import django

    django.setup()
    return env


def _effects(store: str, notes: list[str]) -> Counter[str]:
    if store == "cache":
        from django.core.cache import caches

        from tests.reliability_views import runs_key

        client = caches["store"].client.get_client(write=True)
        values = client.mget([runs_key(note) for note in notes])
        return Counter({note: int(value or 0) for note, value in zip(notes, values, strict=True)})
    from tests.models import Charge

    counts = Counter(Charge.objects.filter(note__in=notes).values_list("note", flat=True))
    return Counter({note: counts[note] for note in notes})


def _server_version(store: str) -> str:
    if store == "cache":
        from django.core.cache import caches

        info = caches["store"].client.get_client(write=True).info("server")
        return f"Redis {info['redis_version']}"
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT version()")
        (version,) = cursor.fetchone()
    if connection.vendor == "postgresql":
        return " ".join(version.split()[:2])
    return f"MariaDB {version.split('-')[0]}"


def _figures(run: str, result: Any, effects: Counter[str], seconds: float) -> dict[str, Any]:
    from tests.multi_server_support import percentile

    latencies = result.latencies()
    per_key = Counter(effects.values())
    return {
        "run": run,
        "operations": len(result.operations),
        "requests": result.requests,
        "seconds": round(seconds, 1),
        "rps": round(result.requests / seconds),
        "p50_ms": round(percentile(latencies, 0.5) * 1000),
        "p99_ms": round(percentile(latencies, 0.99) * 1000),
        "server_errors": result.server_errors(),
        "instance_server_errors": result.server_errors(from_instances=True),
        "dropped": sum(result.dropped.values()),
        "effects_per_key": {str(k): v for k, v in sorted(per_key.items())},
        "moved_keys": result.moved_keys(),
        "moved_retries": result.moved_retries(),
        "served": dict(sorted(result.served().items())),
        "answers": dict(sorted(result.summary().items())),
        "problems": result.problems()[:5],
    }


def run_one(store: str, args: argparse.Namespace) -> dict[str, Any]:
    url = STORES[store]
    env = _setup_django(store, url)
    from django.db import connection

    from tests.multi_server_support import Topology, run_http_storm, settle
    from tests.storm_support import new_operations

    test_database = None
    if store != "cache":
        test_database = f"test_idempotency_ms_{store}"
        connection.settings_dict["TEST"]["NAME"] = test_database
        old_name = connection.settings_dict["NAME"]
        connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
        env["RELIABILITY_DATABASE_URL"] = urlunsplit(
            urlsplit(url)._replace(path="/" + test_database)
        )
    directory = Path(tempfile.mkdtemp(prefix="idempotency-multi-"))
    storm = {
        "clients": args.clients,
        "max_retries": 10,
        "spread": args.operations / 60,
        "retry_window": 0.6,
    }
    runs: list[dict[str, Any]] = []
    ok = True
    topology = Topology(directory, binary=args.haproxy, workers=args.workers, **env)
    try:
        urls = ["/count/lease/"] if store == "cache" else ["/effect/atomic/", "/effect/lease/"]
        operations = new_operations(args.operations, urls, max_sleep=0.15, seed=16)
        result = run_http_storm(topology.port, operations, seed=16, **storm)
        effects = _effects(store, [op.note for op in operations])
        figures = _figures("storm", result, effects, result.seconds)
        runs.append(figures)
        ok &= not figures["problems"] and not figures["dropped"] and not result.errors
        ok &= set(effects.values()) == {1}

        if not args.no_kill:
            urls = ["/count/lease/"] if store == "cache" else ["/effect/atomic/"]
            operations = new_operations(args.operations, urls, max_sleep=0.15, seed=17)
            victim = "app2"
            killer = threading.Timer(storm["spread"] * 0.4, topology.kill, args=(victim,))
            killer.start()
            result = run_http_storm(topology.port, operations, seed=17, **storm)
            killer.join()
            started = time.monotonic()
            finals = settle(topology.port, operations, clients=args.clients)
            settled = time.monotonic() - started
            effects = _effects(store, [op.note for op in operations])
            figures = _figures(f"storm, {victim} killed", result, effects, result.seconds)
            unsettled = [f for f in finals.values() if isinstance(f, str) or f.status != 201]
            # The 5xx answers of the requests the kill cut off are its expected harm, and the
            # settling retries judge the outcome: no list of "problems" here.
            del figures["problems"]
            figures["settle_seconds"] = round(settled, 1)
            figures["unsettled"] = len(unsettled)
            runs.append(figures)
            ok &= not unsettled and 0 not in effects.values()
            ok &= figures["instance_server_errors"] == 0 and not result.errors
            if store != "cache":  # the atomic mode: exactly once, crashes included
                ok &= set(effects.values()) == {1}
        version = _server_version(store)
    finally:
        topology.stop()
        if test_database is not None:
            connection.creation.destroy_test_db(old_name, verbosity=0)
        else:
            from django.core.cache import caches

            from tests.redis_support import delete_keys

            delete_keys(
                caches["store"].client.get_client(write=True), env["RELIABILITY_KEY_PREFIX"]
            )
        shutil.rmtree(directory, ignore_errors=True)
    return {"store": store, "version": version, "runs": runs, "ok": ok}


# -- The whole run ---------------------------------------------------------------------------


def _effects_text(effects: dict[str, int]) -> str:
    if list(effects) == ["1"]:
        return f"1 for all {effects['1']:,}"
    return ", ".join(f"{count:,} keys: {k}" for k, count in effects.items())


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| store | run | requests | requests/s | p50 | p99 | 5xx (by an instance) | dropped "
        "| effects per key | retries answered by another instance |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for outcome in results:
        for run in outcome["runs"]:
            moved, retries = run["moved_retries"]
            lines.append(
                f"| {NAMES[outcome['store']]} | {run['run']} | {run['requests']:,} "
                f"| {run['rps']:,} | {run['p50_ms']} ms | {run['p99_ms']} ms "
                f"| {run['server_errors']} ({run['instance_server_errors']}) "
                f"| {run['dropped']} | {_effects_text(run['effects_per_key'])} "
                f"| {moved:,} of {retries:,} ({moved / retries:.0%}) |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=[*STORES, "all"], default="all")
    parser.add_argument("--operations", type=int, default=500, help="per storm (default 500)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="per instance (default 2)")
    parser.add_argument("--no-kill", action="store_true", help="skip the storm with a kill")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/scaling.md")
    parser.add_argument("--one", choices=list(STORES), help=argparse.SUPPRESS)
    parser.add_argument("--haproxy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(RESULT + json.dumps(run_one(args.one, args)), flush=True)
        return 0

    haproxy = ensure_haproxy()
    haproxy_version = subprocess.run(
        [haproxy, "-v"], capture_output=True, text=True, check=True
    ).stdout.split()[2]
    stores = list(STORES) if args.store == "all" else [args.store]
    results = []
    started = time.monotonic()
    for store in stores:
        print(f"::: {NAMES[store]}", flush=True)
        command = [
            sys.executable,
            __file__,
            *("--one", store, "--haproxy", haproxy),
            *("--operations", str(args.operations), "--clients", str(args.clients)),
            *("--workers", str(args.workers)),
            *(["--no-kill"] if args.no_kill else []),
        ]
        process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT)]
        if process.returncode or not lines:
            print(process.stdout[-3000:], process.stderr[-3000:], sep="\n")
            return 1
        outcome = json.loads(lines[-1][len(RESULT) :])
        for run in outcome["runs"]:
            print(json.dumps(run))
        results.append(outcome)
    minutes = (time.monotonic() - started) / 60
    versions = ", ".join(outcome["version"] for outcome in results)
    text = (
        f"Measured by `python benchmarks/multi_server.py` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d}: {versions}, HAProxy {haproxy_version}, "
        f"3 gunicorn instances with {args.workers} sync workers each, {args.clients} clients, "
        f"{args.operations} operations per storm, all on one machine with {os.cpu_count()} CPU "
        f"cores; the whole run took {minutes:.1f} minutes. *Requests* counts answered "
        f"requests; p50 and p99 are their latencies as the clients saw them; *5xx* counts "
        f"every `5xx` answer, and in brackets those an instance sent (the others are HAProxy's "
        f"`502` for a request inside the killed instance).\n\n{table(results)}"
    )
    print()
    print(text)
    if args.docs:
        write_section(DOCS, *MARKERS, text)
    failed = [NAMES[outcome["store"]] for outcome in results if not outcome["ok"]]
    if failed:
        print(f"the rule was broken on: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
