"""``manage.py idempotency_abandoned``: list, or complete, requests abandoned mid-way."""

from __future__ import annotations

from argparse import ArgumentTypeError
from json import dumps
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections, router
from django.db.models.functions import Now

from django_idempotency.conf import conf, get_store
from django_idempotency.models import IdempotencyKey

#: At most this many keys are listed (the count is always exact).
LIMIT = 100


def _status(text: str) -> int:
    try:
        status = int(text)
    except ValueError:
        status = 0
    if not 100 <= status <= 599:
        # argparse's own error: a usage message and exit status 2, as for any bad argument.
        raise ArgumentTypeError(f"must be an HTTP status code (100-599), not {text!r}")
    return status


class Command(BaseCommand):
    help = (
        "List the requests abandoned mid-way: unfinished keys whose request stopped (its lease "
        "passed, or in the atomic mode it is old and unlocked) after committing phases, and "
        "for which no retry has come to resume them. With --complete, mark them finished "
        "without a response, once you have settled them by hand: their retries then get 409 "
        "and never run again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--all",
            action="store_true",
            help="Also list stale keys whose request stopped before committing any phase.",
        )
        parser.add_argument("--scope", help="Only keys of this scope.")
        parser.add_argument("--key", help="Only this key.")
        parser.add_argument(
            "--complete",
            action="store_true",
            help="Mark the keys listed finished, without a response.",
        )
        parser.add_argument(
            "--status",
            type=_status,
            default=500,
            help="The original status recorded by --complete (default 500).",
        )
        parser.add_argument("--json", action="store_true", help="Print JSON.")
        parser.add_argument(
            "--database",
            metavar="ALIAS",
            help="The database of the keys (default: where the router writes IdempotencyKey).",
        )

    def handle(
        self,
        *,
        all: bool,
        scope: str | None,
        key: str | None,
        complete: bool,
        status: int,
        json: bool,
        database: str | None,
        **options: Any,
    ) -> None:
        store = get_store()
        if not getattr(store, "supports_phases", False):
            raise CommandError(
                f"IDEMPOTENCY_STORE is {conf.IDEMPOTENCY_STORE}, which keeps no recovery "
                "points: requests abandoned mid-way exist only with the DatabaseStore."
            )
        database = database or router.db_for_write(IdempotencyKey)
        if database not in connections.settings:
            known = ", ".join(sorted(connections.settings))
            raise CommandError(f"--database: no database {database!r} (configured: {known}).")
        keys = IdempotencyKey.objects.using(database)
        keys = keys.stale() if all else keys.abandoned()
        if scope is not None:
            keys = keys.filter(scope=scope)
        if key is not None:
            keys = keys.filter(key=key)
        try:
            rows = list(keys.annotate(db_now=Now()).order_by("created_at", "pk")[:LIMIT])
            count = keys.count()
            completed = None
            if complete:
                completed = keys.complete_abandoned(status=status, all_stale=all, using=database)
        except ValueError as exc:  # a bad status given through call_command()
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            raise CommandError(f"Could not read the keys: {exc}") from exc
        listed = [_describe(row) for row in rows]
        if json:
            report: dict[str, Any] = {"count": count, "keys": listed}
            if completed is not None:
                report["completed"] = completed
            self.stdout.write(dumps(report, indent=2))
            return
        self._print(listed, count, all)
        if completed is not None:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Completed {completed:,} {_keys(completed)} without a response (original "
                    f"status {status}): retries get 409 and never run again."
                )
            )

    def _print(self, listed: list[dict[str, Any]], count: int, everything: bool) -> None:
        what = "stale unfinished" if everything else "abandoned mid-way"
        if not listed:
            self.stdout.write(f"No requests {what}.")
            return
        self.stdout.write(f"{count:,} {_requests(count)} {what}:")
        for entry in listed:
            point = entry["recovery_point"] or "(no phase committed)"
            phases = ", ".join(entry["phases"]) or "-"
            self.stdout.write(
                f"  {entry['scope']} {entry['key']!r}: {entry['method']} {entry['path']}, "
                f"stopped after {point} (phases: {phases}), started {entry['age_seconds']:,} s "
                "ago"
            )
        if count > len(listed):
            self.stdout.write(f"  ... and {count - len(listed):,} more.")


def _describe(row: Any) -> dict[str, Any]:
    points = row.recovery_points or []
    return {
        "scope": row.scope,
        "key": row.key,
        "method": row.method,
        "path": row.path,
        "recovery_point": row.recovery_point,
        "phases": [str(name) for name, _ in points],
        "created_at": row.created_at.isoformat(),
        "age_seconds": int((row.db_now - row.created_at).total_seconds()),
    }


def _keys(count: int) -> str:
    return "key" if count == 1 else "keys"


def _requests(count: int) -> str:
    return "request" if count == 1 else "requests"
