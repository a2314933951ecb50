"""Several gunicorn instances behind a real HAProxy, and a retry storm sent through it.

``Topology`` starts ``instances`` gunicorns (``tests.reliability_support.Server``, each with
its own worker processes and port) and HAProxy balancing round robin over them, with no
stickiness, so that the retries of one key land on other instances than its first attempt.
HAProxy names the instance of every answer (``X-Instance``). ``run_http_storm`` is the retry
storm of ``tests/storm_support.py`` over real HTTP through the balancer. Used by
``tests/test_multi_server.py`` and ``benchmarks/multi_server.py``.
"""

from __future__ import annotations

import heapq
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from django.utils.datastructures import CaseInsensitiveMapping

from tests.redis_support import Answer, free_port
from tests.reliability_support import Server
from tests.storm_support import Operation, StormResult

TIMEOUT = 20  # seconds: for HAProxy to start, and for each request
DEBIAN_HAPROXY = "/usr/sbin/haproxy"
#: The instance of an answer HAProxy made itself (it sets ``X-Instance`` on the servers' only).
BALANCER = "haproxy"


def haproxy_binary() -> str | None:
    """The ``haproxy`` executable (Debian installs it in ``/usr/sbin``), or ``None``."""
    found = shutil.which("haproxy")
    if found is None and os.access(DEBIAN_HAPROXY, os.X_OK):
        found = DEBIAN_HAPROXY
    return found


def haproxy_config(port: int, backends: dict[str, int], *, directory: Path) -> str:
    """Round robin over ``backends`` (name: port), without stickiness, health-checked.

    A connection refused by a dead instance is sent to another one (``retries`` with
    ``option redispatch``); a request already sent to an instance that dies is answered
    ``502`` by HAProxy, which never resends a POST. ``X-Instance`` names the instance.
    """
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{backend_port} check"
        for name, backend_port in backends.items()
    )
    return f"""\
global
    maxconn 2000
    pidfile {directory}/haproxy.pid

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1

frontend storm
    bind 127.0.0.1:{port}
    default_backend app

backend app
    balance roundrobin
    option httpchk GET /ready/
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
    http-response set-header X-Instance %s
{servers}
"""


class LoadBalancer:
    """HAProxy in the foreground on a free port, its configuration in ``directory``."""

    def __init__(self, directory: Path, backends: dict[str, int], binary: str) -> None:
        self.port = free_port()
        self.config = directory / "haproxy.cfg"
        self.config.write_text(haproxy_config(self.port, backends, directory=directory))
        self.log = directory / "haproxy.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.log.read_text(errors='replace')}")
            try:
                if request(self.port, "GET", "/ready/", timeout=1).status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy not ready: {self.log.read_text(errors='replace')}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(TIMEOUT)


def request(
    port: int,
    method: str,
    url: str,
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> Answer:
    """One request on a connection of its own (as a retrying client opens after a failure)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.monotonic()
        conn.request(method, url, body, headers or {})
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


def post(port: int, operation: Operation) -> Answer:
    body = json.dumps({"amount": operation.amount}).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": operation.key}
    return request(port, "POST", operation.url, body, headers=headers)


class Topology:
    """``instances`` gunicorns with ``workers`` sync workers each, and HAProxy in front.

    ``env`` configures the app (``tests/reliability_settings.py``): the same settings, and so
    the same database or Redis, on every instance.
    """

    def __init__(
        self, directory: Path, *, binary: str, instances: int = 3, workers: int = 2, **env: str
    ) -> None:
        self.servers: dict[str, Server] = {}
        try:
            for number in range(1, instances + 1):
                self.servers[f"app{number}"] = Server(directory, workers=workers, **env)
            ports = {name: server.port for name, server in self.servers.items()}
            self.balancer = LoadBalancer(directory, ports, binary)
        except BaseException:
            self.stop_servers()
            raise

    @property
    def port(self) -> int:
        return self.balancer.port

    def kill(self, name: str) -> None:
        """SIGKILL one instance, its workers first: requests inside it die with it."""
        server = self.servers[name]
        master = server.process.pid
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        server.process.kill()
        server.process.wait(TIMEOUT)

    def stop_servers(self) -> None:
        for server in self.servers.values():
            if server.process.poll() is None:
                server.stop()

    def stop(self) -> None:
        try:
            self.balancer.stop()
        finally:
            self.stop_servers()


@dataclass
class HttpStormResult(StormResult):
    """A storm's answers, plus what only a real network shows."""

    #: Per operation, in the order sent: the instance that answered each attempt.
    instances: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    #: Attempts that got no HTTP answer at all (the connection dropped), by exception name.
    dropped: Counter[str] = field(default_factory=Counter)

    def latencies(self) -> list[float]:
        return sorted(a.elapsed for answers in self.answers.values() for a in answers)

    def server_errors(self, *, from_instances: bool = False) -> int:
        """``5xx`` answers; with ``from_instances``, only those an instance (not HAProxy) sent."""
        return sum(
            answer.status >= 500
            and (not from_instances or answer.headers.get("X-Instance") is not None)
            for answers in self.answers.values()
            for answer in answers
        )

    def _by_instance(self) -> list[list[str]]:
        """Per operation, the instances that answered its attempts, in the order sent.

        Answers HAProxy made itself (a ``502`` for a request inside a killed instance) name
        no instance, and are left out.
        """
        return [
            [name for _, name in sorted(attempts) if name != BALANCER]
            for attempts in self.instances.values()
        ]

    def moved_keys(self) -> int:
        """Operations with at least one attempt answered by another instance than its first."""
        return sum(
            any(name != names[0] for name in names[1:]) for names in self._by_instance() if names
        )

    def moved_retries(self) -> tuple[int, int]:
        """Retries answered by another instance than their operation's first attempt, and all
        retries answered by an instance."""
        moved = retries = 0
        for names in self._by_instance():
            retries += len(names[1:])
            moved += sum(name != names[0] for name in names[1:])
        return moved, retries

    def served(self) -> Counter[str]:
        return Counter(name for attempts in self.instances.values() for _, name in attempts)


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of the sorted ``values`` lie (nearest rank)."""
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(fraction * len(values)) - 1))
    return values[index]


def run_http_storm(
    port: int,
    operations: list[Operation],
    *,
    clients: int,
    max_retries: int,
    spread: float,
    retry_window: float,
    seed: int,
    timeout: float = 300,
) -> HttpStormResult:
    """``tests.storm_support.run_storm``'s schedule, sent over HTTP to 127.0.0.1:``port``.

    A dropped connection is recorded in ``dropped`` and not retried here: the storm's own
    retries, and any settling afterwards, are the client's retries.
    """
    rng = random.Random(seed)
    schedule: list[tuple[float, int, Operation]] = []
    for index, operation in enumerate(operations):
        first = spread * index / max(1, len(operations))
        schedule.append((first, len(schedule), operation))
        for _ in range(rng.randint(1, max_retries)):
            schedule.append((first + rng.uniform(0, retry_window), len(schedule), operation))
    heapq.heapify(schedule)
    result = HttpStormResult(
        operations,
        {operation.note: [] for operation in operations},
        instances={operation.note: [] for operation in operations},
    )
    lock = threading.Lock()
    started = time.monotonic()

    def client_thread() -> None:
        try:
            while True:
                with lock:
                    if not schedule:
                        return
                    at, _, operation = heapq.heappop(schedule)
                time.sleep(max(0.0, started + at - time.monotonic()))
                sent = time.monotonic()
                try:
                    answer = post(port, operation)
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        result.dropped[type(exc).__name__] += 1
                    continue
                with lock:
                    result.answers[operation.note].append(answer)
                    instance = answer.headers.get("X-Instance", BALANCER)
                    result.instances[operation.note].append((sent, instance))
        except BaseException as exc:
            with lock:
                result.errors.append(exc)

    threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, started + timeout - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        result.errors.append(TimeoutError(f"the storm did not end in {timeout} s"))
    result.seconds = time.monotonic() - started
    return result


def settle(
    port: int, operations: list[Operation], *, clients: int, deadline: float = 60
) -> dict[str, Answer | str]:
    """Retry every operation until it has a final answer (neither dropped, 5xx nor 409).

    What a client does after a storm in which an instance died: returns each operation's
    final answer, or the last thing it saw when ``deadline`` passed.
    """
    finals: dict[str, Answer | str] = {}
    lock = threading.Lock()
    pending = list(operations)

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                operation = pending.pop()
            give_up = time.monotonic() + deadline
            last: Answer | str = "never sent"
            while time.monotonic() < give_up:
                try:
                    last = post(port, operation)
                except (OSError, http.client.HTTPException) as exc:
                    last = type(exc).__name__
                else:
                    if last.status < 500 and last.status != 409:
                        break
                time.sleep(0.1)
            with lock:
                finals[operation.note] = last

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return finals
