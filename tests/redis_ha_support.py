"""Highly available Redis for the tests: a Sentinel group and a 3-master Redis Cluster.

Every server is a ``redis-server`` of the test's own, on free ports, keeping nothing on disk;
``tests/test_redis_ha.py`` starts them, kills the master of a Sentinel group mid-storm, and
runs the cache store on a cluster.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.redis_support import REQUIRE_SERVICES, free_port, services_required

TIMEOUT = 10  # seconds: how long a server, a group or a cluster may take to get ready


def binaries() -> tuple[str, str]:
    """``redis-server`` and ``redis-cli``; skips the test without them (fails when required)."""
    found = [shutil.which(name) for name in ("redis-server", "redis-cli")]
    if None in found:
        problem = "redis-server and redis-cli, which are not on PATH (apt-get install redis-server)"
        if services_required():
            pytest.fail(f"needs {problem}, and {REQUIRE_SERVICES} is set", pytrace=False)
        pytest.skip(f"needs {problem}")
    server, cli = found
    assert server is not None
    assert cli is not None
    return server, cli


def wait_until(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout} s waiting until {what}")
        time.sleep(0.05)


class Node:
    """One ``redis-server`` process (a master, a replica, a sentinel or a cluster node)."""

    def __init__(self, binary: str, directory: Path, *arguments: str, config: str = "") -> None:
        self.port = free_port()
        self.directory = directory / str(self.port)
        self.directory.mkdir()
        command = [binary]
        if config:  # a sentinel needs a configuration file it can rewrite
            path = self.directory / "sentinel.conf"
            path.write_text(config)
            command += [str(path), "--sentinel"]
        command += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        if not config:
            command += ["--save", "", "--appendonly", "no"]
            # A replica's first sync starts at once, not after Redis 7's default 5 seconds.
            command += ["--repl-diskless-sync-delay", "0"]
        log = (self.directory / "log").open("ab")
        with log:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [*command, *arguments], stdout=log, stderr=subprocess.STDOUT
            )
        import redis  # not at the top: the tox "minimal" env has no redis-py

        self.client = redis.Redis(port=self.port, socket_timeout=1, decode_responses=True)
        wait_until(self._answers, f"redis-server answers on port {self.port}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"redis-server on port {self.port} exited: see {self.directory}/log")
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    def pause(self) -> None:
        """SIGSTOP: up but deaf; a paused replica acknowledges nothing its master sends."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: gone at once, with whatever it had not yet sent to its replicas."""
        if self.process is not None:
            process, self.process = self.process, None
            process.send_signal(signal.SIGCONT)  # a paused process dies as well, but at once
            process.kill()
            process.wait(TIMEOUT)
        self.client.close()


def acknowledging(master: Node, replicas: int) -> bool:
    """Whether ``replicas`` replicas acknowledge a write to ``master`` (WAIT counts a replica
    only from its first acknowledgement after its sync, up to a second after its link is up)."""
    master.client.set("acknowledging", 1)
    return int(master.client.wait(replicas, 100)) >= replicas


class SentinelGroup:
    """A master, one or more replicas and one sentinel (quorum 1) watching them."""

    def __init__(self, server: str, directory: Path, replicas: int = 1) -> None:
        self.service = f"idempotency-{uuid.uuid4().hex[:8]}"  # django-redis pools by URL
        self.nodes: list[Node] = []
        self.master = self._start(server, directory)
        self.replicas = [
            self._start(server, directory, "--replicaof", "127.0.0.1", str(self.master.port))
            for _ in range(replicas)
        ]
        self.replica = self.replicas[0]
        self.sentinel = self._start(
            server,
            directory,
            config=(
                f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n"
                f"sentinel down-after-milliseconds {self.service} 400\n"
                f"sentinel failover-timeout {self.service} 3000\n"
            ),
        )
        wait_until(self._replicating, "the replica is in sync and the sentinel knows it")

    def _start(self, *arguments: Any, **config: str) -> Node:
        node = Node(*arguments, **config)
        self.nodes.append(node)
        return node

    def _replicating(self) -> bool:
        links = [
            node.client.info("replication").get("master_link_status") for node in self.replicas
        ]
        known = self.sentinel.client.execute_command("SENTINEL", "REPLICAS", self.service)
        return (
            links == ["up"] * len(self.replicas)
            and len(known) == len(self.replicas)
            and acknowledging(self.master, len(self.replicas))
        )

    def master_port(self) -> int:
        _, port = self.sentinel.client.execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
        )
        return int(port)

    def cache(self, **options: Any) -> dict[str, Any]:
        """A django-redis cache entry for the group, through django-redis's Sentinel client."""
        return {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://{self.service}/0",
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.SentinelClient",
                "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
                "SENTINELS": [("127.0.0.1", self.sentinel.port)],
                **options,
            },
        }

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()


class Cluster:
    """A Redis Cluster of three masters, no replicas, made with ``redis-cli --cluster create``."""

    def __init__(self, server: str, cli: str, directory: Path) -> None:
        self.nodes: list[Node] = []
        for _ in range(3):
            self.nodes.append(
                Node(
                    server,
                    directory,
                    *("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
                    # Its bus port, else the port + 10000, which a free high port cannot have.
                    *("--cluster-port", str(free_port())),
                )
            )
        try:
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=TIMEOUT,
            )
            wait_until(self._ready, "the cluster state is ok on every node")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        return all(node.client.cluster("info")["cluster_state"] == "ok" for node in self.nodes)

    @property
    def location(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
