"""Lease heartbeats: keep a lease-mode claim alive while its work runs.

One scheduler thread per process starts a heartbeat's own thread only when its first renewal
is due, so the many requests that finish before then cost no thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from datetime import timedelta

from django.db import connections

from django_idempotency.records import ClaimRequest
from django_idempotency.stores import Store

logger = logging.getLogger("django_idempotency")


class Heartbeat:
    """Keeps a lease-mode claim alive while its view runs, so no retry can take it over.

    Most views finish long before their first renewal is due (a third of the lease), so a
    heartbeat's own thread is only started then, by the process's :class:`_Scheduler`; until
    then it costs an entry in the scheduler's queue rather than a thread per request. Each
    renewing heartbeat keeps its own thread (and database connection), so a renewal stuck on
    the database delays no other request's.
    """

    def __init__(self, store: Store, claim: ClaimRequest, lease: timedelta) -> None:
        self._store, self._claim, self._lease = store, claim, lease
        self._interval = max(lease.total_seconds() / 3, 0.05)
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        _scheduler().add(time.monotonic() + self._interval, self)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def start(self) -> None:
        """Start renewing now (the first renewal is due), unless the view has finished."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name="idempotency-heartbeat", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    if not self._store.renew(self._claim, lease=self._lease):
                        return
                except Exception:  # keep beating: the next renewal may well succeed
                    logger.warning("Could not renew the lease of key %r.", self._claim.key)
                if self._stopped.wait(self._interval):
                    return
        finally:
            connections.close_all()  # this thread's own connections only

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            thread = self._thread
        if thread is None:
            _scheduler().forget()
        else:
            # Don't wait long: a renewal in flight can be stuck behind our own transaction (an
            # uncommitted claim under ATOMIC_REQUESTS on MariaDB), which only ends after we
            # return. Renewals are fenced on the unfinished state, so a late one changes
            # nothing.
            thread.join(timeout=0.5)


class _Scheduler:
    """One thread per process that starts each heartbeat when its first renewal is due."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._queue: list[tuple[float, int, Heartbeat]] = []
        self._order = itertools.count()  # ties in time never compare heartbeats
        self._thread: threading.Thread | None = None
        self._stopped = 0  # heartbeats in the queue that stopped before they started

    def add(self, due: float, heartbeat: Heartbeat) -> None:
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="idempotency-heartbeat-scheduler", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._queue, (due, next(self._order), heartbeat))
            if self._queue[0][2] is heartbeat:  # the thread sleeps until a later time
                self._condition.notify()

    def forget(self) -> None:
        """Note that a queued heartbeat has stopped; drop such entries once they are most.

        Otherwise a long lease (a long wait until the first renewal) under a high request
        rate would keep every finished request's heartbeat queued until that time.
        """
        with self._condition:
            self._stopped += 1
            if self._stopped > 1000 and self._stopped * 2 > len(self._queue):
                self._queue = [entry for entry in self._queue if not entry[2].stopped]
                heapq.heapify(self._queue)
                self._stopped = 0

    def _serve(self) -> None:
        while True:
            with self._condition:
                while True:
                    now = time.monotonic()
                    if self._queue and self._queue[0][0] <= now:
                        heartbeat = heapq.heappop(self._queue)[2]
                        if heartbeat.stopped:
                            self._stopped = max(self._stopped - 1, 0)
                        break
                    self._condition.wait(self._queue[0][0] - now if self._queue else None)
            try:
                heartbeat.start()  # does nothing for a heartbeat already stopped
            except Exception:  # pragma: no cover - out of threads: keep serving the others
                logger.exception("Could not start a lease heartbeat.")


_schedulers: dict[int, _Scheduler] = {}
_schedulers_lock = threading.Lock()


def _scheduler() -> _Scheduler:
    """This process's scheduler; a forked child (gunicorn's workers) gets its own."""
    pid = os.getpid()
    with _schedulers_lock:
        scheduler = _schedulers.get(pid)
        if scheduler is None:
            _schedulers.clear()  # the parent's, whose thread did not survive the fork
            scheduler = _schedulers[pid] = _Scheduler()
        return scheduler
