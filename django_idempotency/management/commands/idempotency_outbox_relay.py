"""``manage.py idempotency_outbox_relay``: publish the outbox's events, once or for ever."""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from types import FrameType
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections

from django_idempotency.checks import ensure_valid_settings
from django_idempotency.conf import MAX_BATCH_SIZE, conf
from django_idempotency.management.commands.purge_idempotency_keys import parse_duration
from django_idempotency.models import OutboxEvent
from django_idempotency.outbox import RelayResult, relay

#: In the loop, published events are purged (with ``--purge-older-than``) this often.
PURGE_INTERVAL = timedelta(hours=1)


def _positive_integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_BATCH_SIZE:
        raise CommandError(
            f"--batch-size must be an integer from 1 to {MAX_BATCH_SIZE:,}, not {text!r}."
        )
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise CommandError(f"--interval must be a number of seconds (0 to 3600), not {text!r}.")
    return value


class Command(BaseCommand):
    help = (
        "Publish the transactional outbox's due events through their publishers "
        "(IDEMPOTENCY_OUTBOX_PUBLISHERS), in batches, marking each published in the transaction "
        "that locks it. Runs until stopped (SIGTERM or Ctrl-C end it between batches), or with "
        "--once until no event is due. Several relays may run at once on PostgreSQL and "
        "MariaDB/MySQL: they skip each other's events."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="Publish every due event, then exit (for cron), instead of running for ever.",
        )
        parser.add_argument(
            "--batch-size",
            type=_positive_integer,
            metavar="N",
            help="Events per transaction (default: IDEMPOTENCY_OUTBOX_BATCH_SIZE).",
        )
        parser.add_argument(
            "--interval",
            type=_interval,
            default=1.0,
            metavar="SECONDS",
            help="How long the loop sleeps when no event is due (default: 1).",
        )
        parser.add_argument(
            "--purge-older-than",
            metavar="DURATION",
            help=(
                "Also delete events published at least this long ago, such as 7d (units s, m, "
                "h, d, w): once with --once, every hour in the loop. Pending events are kept."
            ),
        )
        parser.add_argument(
            "--database",
            metavar="ALIAS",
            help="The database of the outbox (default: where the router writes OutboxEvent).",
        )

    def handle(
        self,
        *,
        once: bool,
        batch_size: int | None,
        interval: float,
        purge_older_than: str | None,
        database: str | None,
        verbosity: int,
        **options: Any,
    ) -> None:
        try:
            # As `manage.py check` does, for call_command() and --skip-checks: a malformed
            # IDEMPOTENCY_OUTBOX_* setting would otherwise fail every event, or the command.
            ensure_valid_settings()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        if database is not None and database not in connections:
            raise CommandError(
                f"--database names {database!r}, which is not in DATABASES "
                f"({', '.join(sorted(connections.settings)) or 'none configured'})."
            )
        retention = None
        if purge_older_than is not None:
            retention = parse_duration(purge_older_than, option="--purge-older-than")
        self.verbosity = verbosity
        self.size = batch_size or conf.IDEMPOTENCY_OUTBOX_BATCH_SIZE
        self.database = database
        if once:
            self._pass(retention, fail=True)
            return
        self._loop(interval, retention)

    def _loop(self, interval: float, retention: timedelta | None) -> None:
        self.stopping = False

        def stop(signum: int, frame: FrameType | None) -> None:
            self.stopping = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        next_purge = time.monotonic()
        try:
            while not self.stopping:
                purge = retention is not None and time.monotonic() >= next_purge
                result = self._pass(retention if purge else None, fail=False)
                if purge and result is not None:  # after a failure, purge on the next pass
                    next_purge = time.monotonic() + PURGE_INTERVAL.total_seconds()
                if result is None or result.published + result.failed < self.size:
                    self._sleep(interval)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.verbosity >= 1:
            self.stdout.write("Stopped.")

    def _sleep(self, interval: float) -> None:
        deadline = time.monotonic() + interval
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def _pass(self, retention: timedelta | None, *, fail: bool) -> RelayResult | None:
        """Relay until no event is due; purge if asked. ``None`` if the database failed."""
        try:
            result = relay(batch_size=self.size, using=self.database)
            purged = (
                None
                if retention is None
                else OutboxEvent.objects.purge_published(older_than=retention, using=self.database)
            )
        except DatabaseError as exc:
            if fail:
                raise CommandError(f"Could not relay the outbox: {exc}") from exc
            # A database restart must not end a relay that a supervisor expects to run.
            self.stderr.write(f"Could not relay the outbox: {exc}")
            for connection in connections.all(initialized_only=True):
                connection.close_if_unusable_or_obsolete()
            return None
        self._report(result, purged, always=fail)
        return result

    def _report(self, result: RelayResult, purged: int | None, *, always: bool) -> None:
        if self.verbosity < 1 or not (always or result.published or result.failed or purged):
            return
        if result.published or result.failed:
            line = f"Published {result.published:,} outbox {_events(result.published)}"
            if result.failed:
                line += f"; {result.failed:,} failed and will be retried"
            style = self.style.WARNING if result.failed else self.style.SUCCESS
            self.stdout.write(style(line + "."))
        elif always:
            self.stdout.write("No outbox events due.")
        if purged is not None and (purged or always):
            self.stdout.write(f"Deleted {purged:,} published outbox {_events(purged)}.")


def _events(count: int) -> str:
    return "event" if count == 1 else "events"
