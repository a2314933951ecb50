"""``manage.py purge_idempotency_keys``: argument parsing and output around ``purge()``."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections

from django_idempotency.conf import MAX_DURATION, conf
from django_idempotency.models import IdempotencyKey, keys_database

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str, *, option: str = "--older-than") -> timedelta:
    """``30m``, ``12h``, ``7d``, ``1d12h``: numbers with units s, m, h, d, w, in that form, of
    at most :data:`~django_idempotency.conf.MAX_DURATION` (a longer one cannot be subtracted
    from the database's clock). ``option`` names the argument in the ``CommandError``."""
    value = text.strip().lower()
    parts = _DURATION.findall(value)
    if not value or "".join(number + unit for number, unit in parts) != value:
        raise CommandError(
            f"{option} must be a duration such as 30m, 12h or 7d (units s, m, h, d, w), "
            f"not {text!r}."
        )
    duration = timedelta()
    try:
        for number, unit in parts:
            duration += timedelta(**{_UNITS[unit]: int(number)})
    except OverflowError:
        duration = timedelta.max
    if duration > MAX_DURATION:
        raise CommandError(
            f"{option} must be a duration of at most {MAX_DURATION.days:,} days, not {text!r}."
        )
    return duration


def _batch_size(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CommandError(f"--batch-size must be a positive integer, not {text!r}.") from None


class Command(BaseCommand):
    help = (
        "Delete expired idempotency keys in batches, one short transaction per batch. Keys "
        "held by a request that is still running are skipped. Safe to run from cron while "
        "traffic flows, twice at once, and to interrupt between batches."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count the keys that would be deleted; delete nothing.",
        )
        parser.add_argument(
            "--batch-size",
            type=_batch_size,
            metavar="N",
            help="Keys deleted per transaction (default: IDEMPOTENCY_PURGE_BATCH_SIZE).",
        )
        parser.add_argument(
            "--older-than",
            metavar="DURATION",
            help=(
                "Only delete keys that expired at least this long ago, such as 30m, 12h, 7d "
                "or 1d12h (default: every expired key)."
            ),
        )
        parser.add_argument(
            "--stale-leases",
            action="store_true",
            help=(
                "Also delete unfinished keys whose request died (lease deadline passed, or "
                "older than IDEMPOTENCY_LEASE and not locked), expired or not."
            ),
        )
        parser.add_argument(
            "--database",
            metavar="ALIAS",
            help=(
                "The database to purge (default: IDEMPOTENCY_DATABASE, else where the "
                "router writes IdempotencyKey)."
            ),
        )

    def handle(
        self,
        *,
        dry_run: bool,
        batch_size: int | None,
        older_than: str | timedelta | None,
        stale_leases: bool,
        database: str | None,
        verbosity: int,
        **options: Any,
    ) -> None:
        if batch_size is None:
            batch_size = conf.IDEMPOTENCY_PURGE_BATCH_SIZE
            if not _positive_int(batch_size):
                raise CommandError(
                    "IDEMPOTENCY_PURGE_BATCH_SIZE must be a positive integer, "
                    f"not {batch_size!r}; see 'manage.py check'."
                )
        elif not _positive_int(batch_size):
            raise CommandError(f"--batch-size must be a positive integer, not {batch_size!r}.")
        if isinstance(older_than, str):
            older_than = parse_duration(older_than)
        elif older_than is not None and older_than < timedelta(0):
            raise CommandError(f"--older-than must not be negative, not {older_than}.")
        if database is None:
            database = keys_database()
        elif database not in connections.settings:
            known = ", ".join(sorted(connections.settings))
            raise CommandError(f"--database: no database {database!r} (configured: {known}).")
        keys = IdempotencyKey.objects.using(database)

        if dry_run:
            self._dry_run(keys, older_than, stale_leases, verbosity)
        else:
            self._purge(keys, batch_size, older_than, stale_leases, database, verbosity)

    def _dry_run(
        self, keys: Any, older_than: timedelta | None, stale_leases: bool, verbosity: int
    ) -> None:
        try:
            count = keys.purgeable(older_than=older_than, stale_leases=stale_leases).count()
        except DatabaseError as exc:
            raise CommandError(f"Could not count the keys: {exc}") from exc
        if verbosity >= 1:
            self.stdout.write(f"Would delete {count:,} {_keys(count)}.")

    def _purge(
        self,
        keys: Any,
        batch_size: int,
        older_than: timedelta | None,
        stale_leases: bool,
        database: str,
        verbosity: int,
    ) -> None:
        what = "expired or stale" if stale_leases else "expired"
        if verbosity >= 2:
            since = f" at least {older_than} ago" if older_than else ""
            self.stdout.write(
                f"Purging idempotency keys that expired{since}"
                + (", and stale unfinished keys," if stale_leases else "")
                + f" from database {database!r}, in batches of {batch_size:,}."
            )
        started = time.monotonic()
        deleted = 0
        batches = keys.purge_batches(
            batch_size=batch_size, older_than=older_than, stale_leases=stale_leases
        )
        try:
            for number, count in enumerate(batches, start=1):
                deleted += count
                if verbosity >= 2:
                    elapsed = time.monotonic() - started
                    self.stdout.write(
                        f"Batch {number:,}: deleted {count:,} {_keys(count)}; "
                        f"{deleted:,} so far, {_rate(deleted, elapsed)}."
                    )
        except KeyboardInterrupt:
            raise CommandError(
                f"Interrupted after deleting {deleted:,} {what} idempotency {_keys(deleted)}. "
                "Every finished batch is committed: run the command again to go on.",
                returncode=130,
            ) from None
        except DatabaseError as exc:
            raise CommandError(
                f"Stopped after deleting {deleted:,} {what} idempotency {_keys(deleted)}: {exc}"
            ) from exc
        elapsed = time.monotonic() - started
        if verbosity < 1:
            return
        if deleted:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Deleted {deleted:,} {what} idempotency {_keys(deleted)} in "
                    f"{elapsed:.2f} s ({_rate(deleted, elapsed)})."
                )
            )
        else:
            self.stdout.write(f"No {what} idempotency keys.")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _keys(count: int) -> str:
    return "key" if count == 1 else "keys"


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f} keys/s" if seconds > 0 else "instant"
