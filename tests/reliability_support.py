"""Helpers for the reliability tests: a real gunicorn, a client that retries, a private PostgreSQL.

``Server`` runs ``tests/reliability_views.py`` under gunicorn with sync worker processes
(settings: ``tests/reliability_settings.py``). ``retry_until_done`` is a client on a bad day:
it retries on a dropped connection, a ``5xx`` or a ``409`` until it gets its answer.
``PrivatePostgres`` is a PostgreSQL server of the test's own (``initdb`` into a temporary
directory), which the test may stop and restart without touching the shared server.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.db import connection
from django.utils.datastructures import CaseInsensitiveMapping

from tests.redis_support import Answer, free_port, services_required

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20  # seconds: for a server to start or stop, and for each request


def worker_database_url() -> str:
    """``DATABASE_URL`` naming the test database pytest-django created."""
    url = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(url._replace(path="/" + connection.settings_dict["NAME"]))


# -- A real gunicorn -------------------------------------------------------------------------


class Server:
    """A gunicorn serving ``tests.reliability_views`` on 127.0.0.1 with sync worker processes.

    ``env`` configures the app (see ``tests/reliability_settings.py``). Views held by a hold
    file (``hold()``) write a marker naming their process, so a test can SIGKILL exactly the
    worker that runs them; the master then forks a new worker, as in production.
    """

    def __init__(
        self,
        directory: Path,
        *,
        workers: int = 2,
        settings: str = "tests.reliability_settings",
        timeout: int = 120,
        ready_path: str = "/ready/",
        **env: str,
    ) -> None:
        self.directory = directory
        self.ready_path = ready_path
        self.port = free_port()
        self.log = directory / f"gunicorn-{self.port}.log"
        full_env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": settings,
            "RELIABILITY_HOLD_DIR": str(directory),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **env,
        }
        full_env.pop("GUNICORN_CMD_ARGS", None)
        command = [
            sys.executable,
            *("-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}"),
            *("--workers", str(workers), "--worker-class", "sync"),
            "--preload",
            # A held view sleeps until killed: gunicorn's own timeout must not kill it first.
            *("--timeout", str(timeout), "--graceful-timeout", "2"),
            *("--chdir", str(ROOT)),
            "django.core.wsgi:get_wsgi_application()",
        ]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_until_ready()

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.process.returncode}:\n{self.output()}")
            try:
                if self.request("GET", self.ready_path, timeout=1).status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gunicorn was not ready after {TIMEOUT} s:\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        try:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(TIMEOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def request(
        self, method: str, url: str, body: bytes = b"", *, timeout: float = TIMEOUT, **headers: str
    ) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            started = time.monotonic()
            conn.request(method, url, body, headers)
            response = conn.getresponse()
            content = response.read()
            return Answer(
                status=response.status,
                content=content,
                headers=CaseInsensitiveMapping(dict(response.getheaders())),
                elapsed=time.monotonic() - started,
            )
        finally:
            conn.close()

    def post(self, url: str, key: str, amount: int = 7) -> Answer:
        body = json.dumps({"amount": amount}).encode()
        return self.request(
            "POST", url, body, **{"Content-Type": "application/json", "Idempotency-Key": key}
        )

    # Holding a view inside a worker, so that the test can kill the worker there.

    def hold(self, note: str, where: str) -> None:
        """Make runs for ``note`` stop ``before`` or ``after`` the effect until ``release()``."""
        (self.directory / f"hold-{note}").write_text(where)

    def wait_inside(self, note: str) -> int:
        """Wait until a held view for ``note`` is inside the view; its worker's pid."""
        marker = self.directory / f"inside-{note}"
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            if time.monotonic() > deadline:
                pytest.fail(f"no worker entered the view in {TIMEOUT} s:\n{self.output()}")
            time.sleep(0.02)
        return int(marker.read_text())

    def release(self, note: str) -> None:
        """Let the held view go on (a killed one is gone already); retries run normally."""
        (self.directory / f"hold-{note}").unlink()


@dataclass
class Outcome:
    """Every answer a retrying client received for one request, and when it got its result."""

    answers: list[Answer | str] = field(default_factory=list)
    done_at: float | None = None

    @property
    def final(self) -> Answer:
        last = self.answers[-1]
        assert isinstance(last, Answer), self.answers
        return last


def retry_until_done(
    send: Any, *, pause: float = 0.1, deadline: float = 60.0, outcome: Outcome | None = None
) -> Outcome:
    """Call ``send()`` until it answers neither a dropped connection, a ``5xx`` nor a ``409``."""
    outcome = outcome or Outcome()
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        try:
            answer = send()
        except (OSError, http.client.HTTPException) as exc:
            outcome.answers.append(type(exc).__name__)
        else:
            outcome.answers.append(answer)
            if answer.status < 500 and answer.status != 409:
                outcome.done_at = time.monotonic()
                return outcome
        time.sleep(pause)
    pytest.fail(f"no final answer after {deadline} s: {outcome.answers[-5:]}")


# -- A PostgreSQL server of the test's own ---------------------------------------------------

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _pg_binary(name: str) -> str | None:
    for directory in PG_BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    return shutil.which(name)


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port, run as the ``postgres`` OS user.

    ``fsync=off``: a crash of the machine may lose it, which is all a test server needs.
    ``stop()`` shuts it down and deletes its directory, whatever state it is in.
    """

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
        problem = None
        if initdb is None or pg_ctl is None:
            problem = "PostgreSQL's initdb and pg_ctl, which are not installed"
        elif os.geteuid() != 0 and shutil.which("runuser") is None:
            problem = "root (to run initdb as the postgres user)"
        if problem is not None:
            if services_required():
                pytest.fail(f"needs {problem}, and IDEMPOTENCY_REQUIRE_SERVICES is set")
            pytest.skip(f"needs {problem}")
        assert initdb is not None
        assert pg_ctl is not None
        self.pg_ctl = pg_ctl
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="idempotency-pg-"))
        self.data = self.directory / "data"
        self.logfile = self.directory / "server.log"
        shutil.chown(self.directory, "postgres", "postgres")
        self._as_postgres(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()
        self.database = f"reliability_{uuid.uuid4().hex[:8]}"
        self._as_postgres(
            _pg_binary("createdb") or "createdb",
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.database),
        )

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{self.database}"

    def _as_postgres(self, *command: str) -> None:
        wrapped = ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command
        result = subprocess.run(wrapped, capture_output=True, timeout=60, check=False)
        if result.returncode:
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            raise RuntimeError(f"{command[0]} failed: {result.stderr.decode()} {log[-2000:]}")

    def _ctl(self, *args: str) -> None:
        self._as_postgres(self.pg_ctl, "-D", str(self.data), *args)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -k {self.directory}"
        self._ctl("-l", str(self.logfile), "-o", options, "-w", "-t", "30", "start")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every session is terminated, then the server is back."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -k {self.directory}"
        self._ctl("-l", str(self.logfile), "-o", options, "-m", "fast", "-w", "-t", "30", "restart")

    def stop_server(self) -> None:
        self._ctl("-m", "fast", "-w", "-t", "30", "stop")

    def _sql(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(
            self.url.replace("postgres://", "postgresql://"), autocommit=True
        ) as conn:
            return conn.execute(sql).fetchall()

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._ctl("-m", "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


class PrivateReplica(PrivatePostgres):
    """A physical streaming replica of a :class:`PrivatePostgres`, on a port of its own.

    Made with ``pg_basebackup -R`` (so it streams from the primary at once), read-only, and
    read by hot standby queries. ``pause()`` stops it replaying the primary's WAL, so it lags
    behind by as much as the test wants; ``resume()`` lets it catch up.
    """

    def __init__(self, primary: PrivatePostgres) -> None:  # copied from the primary: no initdb
        basebackup = _pg_binary("pg_basebackup")
        if basebackup is None:
            problem = "PostgreSQL's pg_basebackup, which is not installed"
            if services_required():
                pytest.fail(f"needs {problem}, and IDEMPOTENCY_REQUIRE_SERVICES is set")
            pytest.skip(f"needs {problem}")
        self.pg_ctl = primary.pg_ctl
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="idempotency-replica-"))
        self.data = self.directory / "data"
        self.logfile = self.directory / "server.log"
        self.database = primary.database
        shutil.chown(self.directory, "postgres", "postgres")
        self._as_postgres(
            basebackup,
            *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"),
            *("-D", str(self.data), "-R", "-X", "stream", "-c", "fast"),
        )
        self.start()

    def pause(self) -> None:
        self._sql("SELECT pg_wal_replay_pause()")

    def resume(self) -> None:
        self._sql("SELECT pg_wal_replay_resume()")

    def caught_up_with(self, primary: PrivatePostgres) -> None:
        """Wait until the replica has replayed everything the primary has written so far."""
        [(lsn,)] = primary._sql("SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + TIMEOUT
        while True:
            [(behind,)] = self._sql(
                f"SELECT pg_wal_lsn_diff('{lsn}', pg_last_wal_replay_lsn()) > 0"
            )
            if not behind:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"the replica did not catch up in {TIMEOUT} s")
            time.sleep(0.05)
