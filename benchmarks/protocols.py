#!/usr/bin/env python3
"""Claim protocols side by side (issue #16, item 5): what a first execution costs.

    .venv/bin/pip install -r requirements/benchmarks.txt    # once: gunicorn, ...
    apt-get install -y wrk                                   # once: the load generator
    .venv/bin/python benchmarks/protocols.py                 # about 6 minutes
    .venv/bin/python benchmarks/protocols.py --quick         # a smoke test, about 2 minutes
    .venv/bin/python benchmarks/protocols.py --before 947f90f --no-docs
    .venv/bin/python benchmarks/protocols.py --database mariadb   # about 4 minutes

Serves the testproject's ``bench`` app with gunicorn once per protocol, each on a database of
its own (``idempotency_proto_*`` on ``$BENCH_POSTGRES_URL`` or ``$BENCH_MARIADB_URL``, as
``load_benchmark.py``). On PostgreSQL:

- ``before``: the package as it was at ``--before`` (a git worktree under
  ``benchmarks/.work/``): a read, then a claim row inserted and committed, then locked, the
  view, the row updated, one commit (two in all);
- ``kept``: the working tree's package: a read, then advisory transaction locks taken and the
  key read again in one round trip, the view, the completed row inserted, one commit;
- ``kept, prepared`` and ``before, prepared``: the same with psycopg's server-side binding,
  which prepares statements (and sends the advisory locks and the read one at a time);
- ``before, 3 indexes``: ``before`` on a key table without its created, state and key indexes
  (the admin's and the purge's), to see what those cost a first execution;
- ``claim in transaction``: ``bench.protocols.InTransactionClaimStore``, the claim row
  inserted inside the view's transaction (``lock_timeout`` 2 s), one commit.

On MariaDB (``--database mariadb``): ``before`` (row claims), ``kept`` (advisory claims with
``GET_LOCK``, whose locks belong to the session and are released by one more statement after
the commit) and ``kept, row claims`` (``bench.protocols.RowClaimsStore``: the working tree's
package with ``claims = "rows"``).

Scenarios, driven by wrk (``benchmarks/idempotency_keys.lua``) in a rotating order over
``--rounds`` rounds: the view without idempotency (one INSERT, served by ``before``), first
executions on every protocol, replays and bursts of concurrent duplicates on some, and a
realistic view (three queries and a DRF serializer). Each ratio is taken within a round,
against the same round's baseline or ``before``, so machine drift hits both sides alike.
Executions are counted server-side: a burst's extra executions are duplicates.

Writes its table into docs/scaling.md (unless ``--no-docs``) and drops its databases (unless
``--keep``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from docs_section import write_section  # benchmarks/, the script's own folder
from load_benchmark import (
    ROOT,
    WORK,
    Benchmark,
    Run,
    Scenario,
    Server,
    milliseconds,
    prepare,
    say,
    stop_all_children,
)

DOCS = ROOT / "docs" / "scaling.md"
MARKERS = {
    "postgresql": ("<!-- protocols-benchmark:start -->", "<!-- protocols-benchmark:end -->"),
    "mariadb": (
        "<!-- protocols-benchmark-mariadb:start -->",
        "<!-- protocols-benchmark-mariadb:end -->",
    ),
}
KEY_TABLE = "django_idempotency_idempotencykey"
#: Dropped for ``before, 3 indexes``: what the admin and the purge use, not the protocol.
SPARE_INDEXES = ["idempotency_created_idx", "idempotency_state_lease_idx", "idempotency_key_idx"]


def worktree(ref: str) -> Path:
    """A checkout of ``ref`` under benchmarks/.work/, made once and reused."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path = WORK / f"before-{commit[:12]}"
    if not path.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), commit],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return path


def build(arguments: argparse.Namespace) -> tuple[list[Server], list[Scenario]]:
    python = Path(sys.executable)
    before = worktree(arguments.before)
    store = "IDEMPOTENCY_STORE"
    port = arguments.port
    old = {"PYTHONPATH": str(before)}
    setups: list[tuple[str, dict[str, str]]] = [("before", old), ("kept", {})]
    if arguments.database == "mariadb":
        setups.append(("kept, row claims", {store: "bench.protocols.RowClaimsStore"}))
        contenders = ["kept, row claims"]
    else:
        setups += [
            ("kept, prepared", {"BENCH_SERVER_SIDE_BINDING": "1"}),
            ("before, prepared", {**old, "BENCH_SERVER_SIDE_BINDING": "1"}),
            ("before, 3 indexes", old),
            (
                "claim in transaction",
                {store: "bench.protocols.InTransactionClaimStore", "BENCH_LOCK_TIMEOUT": "2s"},
            ),
        ]
        contenders = ["claim in transaction"]
    servers = {
        name: Server(
            name,
            port + number,
            python,
            "bench.settings",
            f"idempotency_proto_{number}",
            environment,
        )
        for number, (name, environment) in enumerate(setups)
    }

    def scenario(letter: str, label: str, setup: str, path: str, mode: str) -> Scenario:
        replay_keys = arguments.replay_keys if mode == "replay" else 0
        return Scenario(
            letter, label, setup, servers[setup], path, mode, "ours", replay_keys=replay_keys
        )

    atomic, realistic = "/bench/atomic/", "/bench/realistic/atomic/"
    scenarios = [
        scenario("a", "one INSERT, no idempotency", "before", "/bench/baseline/", "fresh"),
        *(scenario("b", "first executions", name, atomic, "fresh") for name in servers),
        *(scenario("c", "replays", name, atomic, "replay") for name in ("before", "kept")),
        *(
            scenario("d", "concurrent duplicates", name, atomic, "burst")
            for name in ("before", "kept", *contenders)
        ),
        scenario("e", "realistic, no idempotency", "before", "/bench/realistic/baseline/", "fresh"),
        *(
            scenario("e", "realistic first executions", name, realistic, "fresh")
            for name in ("before", "kept")
        ),
    ]
    return list(servers.values()), scenarios


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    benchmark = Benchmark(arguments)
    database = benchmark.database
    started = time.perf_counter()
    servers, scenarios = build(arguments)
    try:
        for server in servers:
            database.recreate(server.database)
            problem = server.migrate(database)
            if problem:
                raise RuntimeError(f"{server.name}: {problem}")
            if server.name.endswith("3 indexes"):
                for index in SPARE_INDEXES:
                    database.execute(server.database, f"DROP INDEX {index}")
        say(f"starting {len(servers)} gunicorn servers, {arguments.workers} workers each")
        for server in servers:
            server.start(database, arguments.workers)
        for server in servers:
            server.wait_until_up()
        for scenario in scenarios:
            if scenario.mode == "replay":
                scenario.replay_tag = benchmark.next_tag()
                benchmark.prefill(scenario)
        for server in servers:
            database.settle(server.database)
        say(f"{len(scenarios)} scenarios ready after {time.perf_counter() - started:.0f} s")
        rounds = arguments.rounds + (1 if arguments.warmup else 0)
        paired: dict[str, list[float]] = {scenario.name: [] for scenario in scenarios}
        for number in range(rounds):
            warmup = arguments.warmup and number == 0
            shift = number * 5 % len(scenarios)
            order = scenarios[shift:] + scenarios[:shift]
            results: dict[str, Run] = {}
            for scenario in order:
                duration = arguments.warmup if warmup else arguments.duration
                results[scenario.name] = measured = benchmark.measure(scenario, duration)
                if not warmup:
                    scenario.runs.append(measured)
            if warmup:
                say("warm-up round done")
                continue
            for scenario in scenarios:
                mine = results[scenario.name].ok / results[scenario.name].seconds
                base = baseline_of(scenario, results)
                scenario.ok_ratios.append(mine / base)
                before = before_of(scenario, results)
                if before:
                    paired[scenario.name].append(mine / before)
            kept = next(s for s in scenarios if s.name == "kept: first executions")
            say(
                f"round {len(kept.ok_ratios)}/{arguments.rounds}: first executions "
                f"{kept.ok_ratios[-1]:.2f}x the one-INSERT view, "
                f"{paired[kept.name][-1]:.2f}x before"
            )
        return {
            "scenarios": scenarios,
            "paired": paired,
            "database": database.label(),
            "seconds": time.perf_counter() - started,
        }
    finally:
        say("stopping the servers")
        stop_all_children()
        if not arguments.keep:
            for server in servers:
                database.drop(server.database)


def baseline_of(scenario: Scenario, results: dict[str, Run]) -> float:
    """The same round's rate of the view without idempotency that ``scenario`` wraps."""
    name = "before: realistic, no idempotency" if "realistic" in scenario.label else None
    run_ = results[name or "before: one INSERT, no idempotency"]
    return run_.ok / run_.seconds


def before_of(scenario: Scenario, results: dict[str, Run]) -> float | None:
    """The same round's rate of ``before`` in the same scenario, if it ran one."""
    run_ = results.get(f"before: {scenario.label}")
    if run_ is None or scenario.setup == "before" or scenario.mode == "burst":
        return None
    return run_.ok / run_.seconds


def median_range(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def report(arguments: argparse.Namespace, result: dict[str, Any]) -> str:
    scenarios: list[Scenario] = result["scenarios"]
    paired: dict[str, list[float]] = result["paired"]
    lines = [
        f"{result['database']}, {arguments.workers} sync gunicorn workers per protocol, wrk "
        f"{arguments.threads} threads / {arguments.connections} connections, "
        f"{arguments.rounds} rounds of {arguments.duration} s, `before` = {arguments.before}; "
        f"{result['seconds'] / 60:.0f} minutes.",
        "",
        "| scenario | protocol | 2xx/s | x the view without idempotency | x `before` | p50 | "
        "p99 | queries per request | executions per key |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for scenario in scenarios:
        seconds = sum(run.seconds for run in scenario.runs)
        rate = scenario.total("ok") / seconds if seconds else 0.0
        extra, keys = scenario.total("extra_executions"), scenario.total("keys")
        executions = (
            ""
            if scenario.mode == "replay" or "no idempotency" in scenario.label
            else ("1 each" if not extra else f"{extra:,} duplicates over {keys:,} keys")
        )
        if scenario.mode == "replay":
            executions = "none" if not extra else f"{extra:,} re-executions"
        queries = scenario.queries_per_request
        lines.append(
            f"| {scenario.label} | {scenario.setup} | {rate:,.0f} | "
            f"{median_range(scenario.ok_ratios)} | {median_range(paired[scenario.name])} | "
            f"{milliseconds(scenario.p50_ms)} | {milliseconds(scenario.p99_ms)} | "
            f"{queries:.1f} | {executions} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s per scenario, one round")
    parser.add_argument("--database", choices=["postgresql", "mariadb"], default="postgresql")
    parser.add_argument("--before", default="947f90f", help="the code compared (947f90f)")
    parser.add_argument("--duration", type=int, help="seconds per scenario and round (4)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds measured (3)")
    parser.add_argument("--warmup", type=int, help="seconds per scenario, warm-up round (1)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers per server")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--replay-keys", type=int, default=200)
    parser.add_argument("--port", type=int, default=8350, help="first port of the servers")
    parser.add_argument("--no-docs", action="store_true", help=f"do not rewrite {DOCS.name}")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark databases")
    arguments = parser.parse_args()
    prepare("protocols", arguments)
    result = run(arguments)
    table = report(arguments, result)
    print()
    print(table)
    if not arguments.no_docs:
        write_section(DOCS, *MARKERS[arguments.database], table)
        say(f"figures written into {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
