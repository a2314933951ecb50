"""Helpers for the Redis tests: cache aliases of their own, a redis-server of their own, answers.

The cache-store tests use the suite's Redis (``REDIS_URL``) under a key prefix of their own,
which they delete afterwards, so they never touch another test's keys (and never flush a
database). The outage tests start, kill, pause and restart a ``redis-server`` of their own on
a free port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import caches
from django.utils.datastructures import CaseInsensitiveMapping

CACHE_STORE = "django_idempotency.stores.CacheStore"
REDIS_BACKEND = "django_redis.cache.RedisCache"
REQUIRE_SERVICES = "IDEMPOTENCY_REQUIRE_SERVICES"
TIMEOUT = 10  # seconds: how long a server may take to start or stop before the test fails


def services_required() -> bool:
    return os.environ.get(REQUIRE_SERVICES, "") not in ("", "0")


def new_prefix() -> str:
    """A cache ``KEY_PREFIX`` no other test uses."""
    return f"idempotency-test-{uuid.uuid4().hex[:12]}"


def use_cache_store(settings: Any, location: str, **cache: Any) -> str:
    """Add a django-redis cache alias on ``location`` and make it the store; return the alias.

    ``cache`` holds the alias's other entries (``KEY_PREFIX``, ``VERSION``, ``OPTIONS``).
    Replacing ``CACHES`` makes Django drop its cache connections, so the alias is fresh.
    """
    alias = f"store-{uuid.uuid4().hex[:8]}"
    settings.CACHES = {
        **settings.CACHES,
        alias: {"BACKEND": REDIS_BACKEND, "LOCATION": location, **cache},
    }
    settings.IDEMPOTENCY_STORE = CACHE_STORE
    settings.IDEMPOTENCY_STORE_CACHE = alias
    return alias


def raw_client(alias: str) -> Any:
    """The redis-py client behind a django-redis cache alias."""
    return caches[alias].client.get_client(write=True)


def delete_keys(client: Any, prefix: str) -> None:
    """Delete every key under a cache ``KEY_PREFIX`` (SCAN, never KEYS or FLUSHDB)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def disconnect(alias: str) -> None:
    """Close the alias's pooled connections (django-redis keeps pools for the whole process)."""
    raw_client(alias).connection_pool.disconnect()


# -- A redis-server of the test's own ------------------------------------------------------


def redis_server_binary() -> str:
    """The ``redis-server`` executable; skips the test without one (fails when required)."""
    binary = shutil.which("redis-server")
    if binary is None:
        problem = "the redis-server executable, which is not on PATH (apt-get install redis-server)"
        if services_required():
            pytest.fail(f"needs {problem}, and {REQUIRE_SERVICES} is set", pytrace=False)
        pytest.skip(f"needs {problem}")
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A ``redis-server`` on 127.0.0.1 that the test starts, kills, pauses and restarts.

    It keeps nothing on disk (no snapshots, no append-only file): a restart starts empty, as a
    cache server that lost its memory would.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        assert self.process is None, "already running"
        log = (self.directory / f"redis-{self.port}.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    *("--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no"),
                    *("--dir", str(self.directory), "--logfile", ""),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + TIMEOUT
        while not _answers_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}: see {log.name}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, with everything it held."""
        assert self.process is not None, "not running"
        process, self.process = self.process, None
        if self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False
        process.kill()
        process.wait(TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and new ones are accepted, but nothing answers."""
        assert self.process is not None, "not running"
        self.process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self.process is not None, "not running"
        self.process.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        if self.process is not None:
            self.kill()


# -- Answers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What a client received, from Django's test client or from a real HTTP server."""

    status: int
    content: bytes
    headers: CaseInsensitiveMapping[str]
    elapsed: float

    @classmethod
    def of(cls, response: Any, started: float) -> Answer:
        return cls(
            status=response.status_code,
            content=response.content,
            headers=CaseInsensitiveMapping(dict(response.items())),
            elapsed=time.monotonic() - started,
        )

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"

    @property
    def code(self) -> str | None:
        if self.headers.get("Content-Type") != "application/problem+json":
            return None
        code: str = json.loads(self.content)["code"]
        return code

    @property
    def run(self) -> str:
        """The id of the view run that produced this answer (``tests.race_views``)."""
        run: str = json.loads(self.content)["run"]
        return run

    def __repr__(self) -> str:
        kind = self.code or ("replay" if self.replayed else "")
        return f"<{self.status} {kind} {self.elapsed:.2f}s>"


def assert_fresh_run(answer: Answer) -> None:
    assert answer.status == 201, answer
    assert not answer.replayed, answer


def assert_in_progress(answer: Answer) -> None:
    assert answer.status == 409, answer
    assert answer.code == "idempotency_key_in_progress"
    assert int(answer.headers["Retry-After"]) >= 1


def assert_replay_of(answer: Answer, first: Answer) -> None:
    assert answer.replayed, answer
    assert answer.status == first.status
    assert answer.content == first.content
    for name in ("Content-Type", "Location"):
        assert answer.headers[name] == first.headers[name]


def assert_store_unavailable(answer: Answer) -> None:
    assert answer.status == 503, answer
    assert answer.code == "idempotency_store_unavailable"
    assert answer.headers["Retry-After"] == "1"
