#!/usr/bin/env python3
"""Developer entry point for a fresh clone: `python3 dev.py demo` and `python3 dev.py test`.

Standard library only, so nothing but python3 is needed. Both commands build `.venv/` with the
Python that runs this script, install what they need into it (pip is skipped when nothing
changed) and then run the demo or the test suite inside it.

    python3 dev.py demo [--port 8000] [--no-serve]
    python3 dev.py test [pytest arguments...]

`test` honours DATABASE_URL (postgres://... or mysql://...) and REDIS_URL; without them the suite
runs on SQLite and the PostgreSQL/MariaDB/Redis tests are skipped. With
IDEMPOTENCY_REQUIRE_SERVICES=1 (set by CI) nothing may be skipped for a missing service.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIREMENTS = ROOT / "requirements"
# Editable install with the extras: the demo and the full suite exercise DRF, django-redis and
# drf-spectacular; the demo's agent client retries with the package's httpx client, and
# encrypts stored responses (cryptography) when IDEMPOTENCY_ENCRYPTION_KEY is set.
PACKAGE = f"{ROOT}[drf,redis,openapi,client,encryption]"
# Names the env var that tells the suite (and this script) that every service must be there.
REQUIRE_SERVICES = "IDEMPOTENCY_REQUIRE_SERVICES"
MINIMUM_PYTHON = (3, 10)


def say(message: str) -> None:
    # One prefix for everything this script prints, so it stands out from pip's and pytest's.
    print(f"dev.py: {message}", flush=True)


def fail(message: str, code: int = 1) -> None:
    print(f"dev.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def services_required() -> bool:
    return os.environ.get(REQUIRE_SERVICES, "") not in ("", "0")


def venv_python() -> Path:
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def python_version(python: Path | str) -> str | None:
    """`3.11` for a working interpreter, None when it is missing or broken."""
    try:
        result = subprocess.run(
            [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def ensure_venv() -> Path:
    """Create .venv with the Python running this script; recreate it if it is broken or older."""
    wanted = "{}.{}".format(*sys.version_info[:2])
    have = python_version(venv_python()) if venv_python().exists() else None
    if have == wanted:
        return venv_python()
    if have is None and VENV.exists():
        # A venv whose interpreter vanished (pyenv version removed, clone moved) cannot be fixed.
        say(f"{VENV.name}/ is broken; recreating it with Python {wanted}")
    elif have is not None:
        say(f"{VENV.name}/ uses Python {have}, this script runs on {wanted}; recreating it")
    else:
        say(f"creating {VENV.name}/ with Python {wanted} ({sys.executable})")
    result = subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=False)
    if result.returncode != 0:
        fail(
            "could not create the virtualenv. On Debian/Ubuntu install python3-venv "
            "(apt-get install python3-venv) and try again."
        )
    return venv_python()


def stamp_digest(*files: Path) -> str:
    """What an install depends on: the interpreter, the package metadata, the requirements."""
    digest = hashlib.sha256()
    digest.update(sys.version.encode())
    for path in (ROOT / "pyproject.toml", ROOT / "setup.cfg", *files):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes() if path.exists() else b"<missing>")
    return digest.hexdigest()


def pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Output is captured and shown only on failure: a working install is noise (and this
    # machine's pip configuration adds a warning per package), a failing one needs every line.
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)


def install(python: Path, profile: str, *requirement_files: str) -> None:
    """Install the package (editable, with extras) and the requirement files, unless unchanged.

    A stamp file in .venv/ records a hash of everything the install depends on, so a second
    run with the same requirements costs nothing.
    """
    files = [REQUIREMENTS / name for name in requirement_files]
    stamp = VENV / f".dev-stamp-{profile}"
    digest = stamp_digest(*files)
    if stamp.exists() and stamp.read_text().strip() == digest:
        say(f"{profile} requirements unchanged, skipping pip")
        return
    say(
        f"installing the package and {', '.join(requirement_files)} into {VENV.name}/ "
        "(about 30 s the first time)"
    )
    started = time.monotonic()
    args = ["-e", PACKAGE]
    for path in files:
        args += ["-r", str(path)]
    result = pip(python, *args)
    if result.returncode != 0:
        stamp.unlink(missing_ok=True)
        print(result.stdout + result.stderr, file=sys.stderr)
        fail("pip install failed (output above)")
    stamp.write_text(digest + "\n")
    say(f"installed in {time.monotonic() - started:.0f} s")


def mysqlclient_importable(python: Path) -> bool:
    result = subprocess.run([str(python), "-c", "import MySQLdb"], capture_output=True, check=False)
    return result.returncode == 0


def ensure_mysqlclient(python: Path, *, required: bool) -> None:
    """Install mysqlclient on its own: it compiles, and may fail where its C headers are missing.

    When MariaDB is not asked for, a failure is a warning and the run goes on (SQLite and
    PostgreSQL do not need it). The stamp remembers the failure so we do not recompile on every
    run; it is retried when the requirements change or MariaDB is asked for.
    """
    requirement = REQUIREMENTS / "mysql.txt"
    stamp = VENV / ".dev-stamp-mysql"
    digest = stamp_digest(requirement)
    recorded = stamp.read_text().split() if stamp.exists() else []
    if recorded == [digest, "ok"] and mysqlclient_importable(python):
        return
    if recorded == [digest, "failed"] and not required:
        say("mysqlclient is not installed (it failed to build earlier): MariaDB/MySQL unavailable")
        return
    say("installing mysqlclient (builds from source)")
    result = pip(python, "-r", str(requirement))
    if result.returncode == 0 and mysqlclient_importable(python):
        stamp.write_text(f"{digest} ok\n")
        return
    stamp.write_text(f"{digest} failed\n")
    # The last lines of the build log name the missing header or tool.
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
    print(tail, file=sys.stderr)
    hint = (
        "mysqlclient failed to build. On Debian/Ubuntu: "
        "apt-get install default-libmysqlclient-dev pkg-config build-essential"
    )
    if required:
        fail(hint)
    say(f"warning: {hint}. Carrying on: SQLite and PostgreSQL do not need it.")


def database_vendor(url: str) -> str:
    if not url:
        return "SQLite"
    scheme = urlsplit(url).scheme.split("+")[0].lower()
    if scheme.startswith(("postgres", "pgsql", "postgis")):
        return "PostgreSQL"
    if scheme.startswith(("mysql", "mariadb")):
        return "MariaDB/MySQL"
    if scheme.startswith(("sqlite", "spatialite")):
        return "SQLite"
    return scheme or "SQLite"


def skipped_services() -> str | None:
    """The line saying which service tests this run skips, or None when it skips none."""
    skipped, hints = [], []
    if database_vendor(os.environ.get("DATABASE_URL", "")) == "SQLite":
        skipped.append("PostgreSQL/MariaDB (row-lock concurrency)")
        hints.append(
            "DATABASE_URL=postgres://user:password@127.0.0.1:5432/db "
            "(or mysql://user:password@127.0.0.1:3306/db)"
        )
    if not os.environ.get("REDIS_URL"):
        skipped.append("Redis")
        hints.append("REDIS_URL=redis://127.0.0.1:6379/1")
    if not skipped:
        return None
    return f"the {' and '.join(skipped)} tests are skipped; to run them set {' and '.join(hints)}"


def describe_services() -> None:
    database_url = os.environ.get("DATABASE_URL", "")
    vendor = database_vendor(database_url)
    say(f"database: {vendor}" + (f" ({database_url})" if database_url else " (in memory)"))
    say(f"redis: {os.environ.get('REDIS_URL') or 'not configured'}")
    if line := skipped_services():
        say(line)


def drop_stale_coverage() -> None:
    """Coverage data recorded before the package last changed describes old line numbers.

    Runs append their data (so a SQLite, a PostgreSQL and a MariaDB run can be combined), but
    appending to data from older code would report lines that no longer exist. Drop it.
    """
    package = ROOT / "django_idempotency"
    newest_source = max((p.stat().st_mtime for p in package.rglob("*.py")), default=0.0)
    for data in ROOT.glob(".coverage*"):
        if data.is_file() and data.stat().st_mtime < newest_source:
            data.unlink()


def command_test(pytest_args: list[str]) -> int:
    python = ensure_venv()
    install(python, "test", "test.txt")
    database_url = os.environ.get("DATABASE_URL", "")
    wants_mysql = database_vendor(database_url) == "MariaDB/MySQL"
    # In CI every database run must be possible, so a missing driver is an error there too.
    ensure_mysqlclient(python, required=wants_mysql or services_required())
    describe_services()
    drop_stale_coverage()
    # `coverage run` (branch, source and parallel mode come from pyproject.toml) writes one
    # .coverage.<host>.<pid>.<random> file per run; .ci/run combines the SQLite, PostgreSQL and
    # MariaDB runs with `coverage combine`.
    command = [str(python), "-m", "coverage", "run", "-m", "pytest", *pytest_args]
    result = subprocess.run(command, cwd=ROOT, check=False)
    runs = sorted(str(path) for path in ROOT.glob(".coverage.*"))
    if runs:
        # Report everything recorded so far (this run plus earlier ones on other databases).
        # Combine into a scratch file in .venv/ and report from it: `coverage report` on the
        # default data file would consume the per-run files that .ci/run combines later.
        report_data = str(VENV / "coverage-report")
        coverage = [str(python), "-m", "coverage"]
        subprocess.run(
            [*coverage, "combine", "--keep", "-q", f"--data-file={report_data}", *runs],
            cwd=ROOT,
            check=False,
        )
        subprocess.run([*coverage, "report", f"--data-file={report_data}"], cwd=ROOT, check=False)
        say(f"coverage above combines {len(runs)} run(s); delete .coverage.* to start afresh")
    if line := skipped_services():
        say(line)
    if result.returncode == 5:
        say("pytest collected no tests: that counts as a failure")
    elif result.returncode != 0:
        say(f"pytest exited with status {result.returncode}")
    return result.returncode


def command_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 dev.py demo",
        description="Migrate the demo project, narrate the idempotency demo, then serve its API.",
    )
    parser.add_argument("--port", type=int, default=8000, help="port for runserver (8000)")
    parser.add_argument(
        "--no-serve", action="store_true", help="stop after the narrated demo (used by CI)"
    )
    options = parser.parse_args(argv)
    manage = ROOT / "testproject" / "manage.py"
    if not manage.exists():
        fail(f"{manage.relative_to(ROOT)} is missing")
    python = ensure_venv()
    install(python, "demo", "demo.txt")
    if database_vendor(os.environ.get("DATABASE_URL", "")) == "MariaDB/MySQL":
        ensure_mysqlclient(python, required=True)
    manage_py = [str(python), str(manage.relative_to(ROOT))]
    for step in (["migrate", "--no-input", "--verbosity", "0"], ["idempotency_demo"]):
        result = subprocess.run([*manage_py, *step], cwd=ROOT, check=False)
        if result.returncode != 0:
            fail(f"`manage.py {step[0]}` failed with status {result.returncode}")
    if options.no_serve:
        return 0
    address = f"127.0.0.1:{options.port}"
    say(f"serving the demo API on http://{address}/ (Ctrl-C to stop)")
    # Replace this process, so Ctrl-C goes straight to runserver and leaves no wrapper behind.
    os.chdir(ROOT)
    os.execv(str(python), [*manage_py, "runserver", address])
    return 0  # not reached


USAGE = """usage: python3 dev.py demo [--port PORT] [--no-serve]
       python3 dev.py test [pytest arguments...]

  demo   build .venv, migrate the demo project, run the narrated demo, serve its API
  test   build .venv, run the test suite with branch coverage
         (DATABASE_URL and REDIS_URL select PostgreSQL/MariaDB and Redis)"""


def main(argv: list[str]) -> int:
    if sys.version_info < MINIMUM_PYTHON:
        fail("django-idempotency needs Python {}.{} or newer".format(*MINIMUM_PYTHON))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "test":
        return command_test(rest)
    if command == "demo":
        return command_demo(rest)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
