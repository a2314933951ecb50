"""The retry-storm soak: storms of 500 operations back to back for minutes (issue #6).

    python benchmarks/soak.py --minutes 5
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/6 \
        python benchmarks/soak.py --minutes 10 --clients 32 --operations 500

Runs ``tests/test_retry_storm.py``'s soak tests (the database store's needs PostgreSQL or
MariaDB in ``DATABASE_URL``; the cache store's needs ``REDIS_URL``) with pytest, which creates
and drops the test database as usual, and prints each storm's figures. Exits with pytest's
status: 0 when every storm ran each operation exactly once with no 5xx.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="per store (default 5)")
    parser.add_argument("--operations", type=int, default=500, help="per storm (default 500)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--retries", type=int, default=10, help="most retries per operation")
    parser.add_argument(
        "--store", choices=["database", "cache", "both"], default="both", help="default both"
    )
    args = parser.parse_args()
    selected = {"database": "database_store", "cache": "cache_store", "both": "soak"}[args.store]
    env = {
        **os.environ,
        "IDEMPOTENCY_SOAK_MINUTES": str(args.minutes),
        "STORM_OPERATIONS": str(args.operations),
        "STORM_CLIENTS": str(args.clients),
        "STORM_RETRIES": str(args.retries),
    }
    command = [
        sys.executable,
        *("-m", "pytest", "tests/test_retry_storm.py", "-k", f"soak and {selected}"),
        *("-p", "no:randomly", "-p", "no:logging", "-q", "-s"),
    ]
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
