"""A retry storm: many clients, many operations, each retried at random moments.

``run_storm`` schedules every operation's first attempt across the storm and each of its
retries at a random moment after it (often while the first is still running), and lets
``clients`` threads send the attempts in scheduled order, each with a Django test client and
a database connection of its own. Used by ``tests/test_retry_storm.py`` and
``benchmarks/soak.py``.
"""

from __future__ import annotations

import heapq
import json
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from django.db import connection
from django.test import Client

from tests.redis_support import Answer


@dataclass(frozen=True)
class Operation:
    note: str
    key: str
    url: str
    amount: int


@dataclass
class StormResult:
    operations: list[Operation]
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(len(answers) for answers in self.answers.values())

    def summary(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for answers in self.answers.values():
            for answer in answers:
                counts[
                    f"{answer.status} {answer.code or ('replay' if answer.replayed else '')}"
                ] += 1
        return counts

    def problems(self) -> list[str]:
        """What breaks the rule: exactly one fresh answer per operation, every other answer an
        identical replay of it or a 409, never a 5xx."""
        found = [f"a client thread failed: {error!r}" for error in self.errors]
        for operation in self.operations:
            answers = self.answers.get(operation.note, [])
            fresh = [a for a in answers if a.status == 201 and not a.replayed]
            if len(fresh) != 1:
                found.append(f"{operation.note}: {len(fresh)} fresh answers")
                continue
            (first,) = fresh
            for answer in answers:
                if answer is first:
                    continue
                if answer.status == 409 and answer.code == "idempotency_key_in_progress":
                    continue
                if (
                    answer.replayed
                    and answer.status == first.status
                    and answer.content == first.content
                    and answer.headers.get("Location") == first.headers.get("Location")
                ):
                    continue
                found.append(f"{operation.note}: unexpected {answer!r} {answer.content[:200]!r}")
        return found


def new_operations(count: int, urls: list[str], *, max_sleep: float, seed: int) -> list[Operation]:
    rng = random.Random(seed)
    operations = []
    for index in range(count):
        note = f"storm-{uuid.uuid4().hex[:10]}"
        sleep = round(rng.uniform(0, max_sleep), 3)
        url = f"{urls[index % len(urls)]}?note={note}&sleep={sleep}"
        operations.append(Operation(note, f"storm-{uuid.uuid4()}", url, rng.randint(1, 999)))
    return operations


def run_storm(
    operations: list[Operation],
    *,
    clients: int,
    max_retries: int,
    spread: float,
    retry_window: float,
    seed: int,
    timeout: float = 300,
) -> StormResult:
    """Send every operation once and retry it 1 to ``max_retries`` times at random moments.

    First attempts are spread evenly over ``spread`` seconds; each retry is sent at a random
    moment up to ``retry_window`` seconds after its operation's first attempt.
    """
    rng = random.Random(seed)
    schedule: list[tuple[float, int, Operation]] = []
    for index, operation in enumerate(operations):
        first = spread * index / max(1, len(operations))
        schedule.append((first, len(schedule), operation))
        for _ in range(rng.randint(1, max_retries)):
            schedule.append((first + rng.uniform(0, retry_window), len(schedule), operation))
    heapq.heapify(schedule)
    result = StormResult(operations, {operation.note: [] for operation in operations})
    lock = threading.Lock()
    started = time.monotonic()

    def client_thread() -> None:
        client = Client(raise_request_exception=False)
        try:
            while True:
                with lock:
                    if not schedule:
                        return
                    at, _, operation = heapq.heappop(schedule)
                time.sleep(max(0.0, started + at - time.monotonic()))
                sent = time.monotonic()
                response = client.post(
                    operation.url,
                    json.dumps({"amount": operation.amount}),
                    content_type="application/json",
                    headers={"Idempotency-Key": operation.key},
                )
                answer = Answer.of(response, sent)
                with lock:
                    result.answers[operation.note].append(answer)
        except BaseException as exc:
            with lock:
                result.errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, started + timeout - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        result.errors.append(TimeoutError(f"the storm did not end in {timeout} s"))
    result.seconds = time.monotonic() - started
    return result
