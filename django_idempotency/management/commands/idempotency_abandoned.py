"""``manage.py idempotency_abandoned``: list, compensate or complete requests abandoned mid-way."""

from __future__ import annotations

from argparse import ArgumentTypeError
from json import dumps
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections
from django.db.models.functions import Now

from django_idempotency.conf import conf, get_store
from django_idempotency.exceptions import IdempotencyStoreUnavailable
from django_idempotency.models import IdempotencyKey, keys_database
from django_idempotency.phases import Compensation, compensate_abandoned

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
        "for which no retry has come to resume them. With --compensate, run the compensations "
        "their phases declared (last phase first, each once) and mark them finished. With "
        "--complete, mark them finished without a response, once you have settled them by "
        "hand. Either way their retries then get 409 and never run again."
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
            "--compensate",
            action="store_true",
            help=(
                "Run the compensations of the keys listed, then mark them finished without a "
                "response. Exits with an error if a compensation raised; run it again to resume."
            ),
        )
        parser.add_argument(
            "--status",
            type=_status,
            default=500,
            help="The original status recorded by --complete or --compensate (default 500).",
        )
        parser.add_argument("--json", action="store_true", help="Print JSON.")
        parser.add_argument(
            "--database",
            metavar="ALIAS",
            help=(
                "The database of the keys (default: IDEMPOTENCY_DATABASE, else where the "
                "router writes IdempotencyKey)."
            ),
        )

    def handle(
        self,
        *,
        all: bool,
        scope: str | None,
        key: str | None,
        complete: bool,
        compensate: bool,
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
        if compensate and complete:
            raise CommandError("--compensate and --complete exclude each other: choose one.")
        if compensate and all:
            raise CommandError(
                "--compensate acts on requests abandoned mid-way; the stale keys --all adds "
                "committed no phase, so there is nothing to compensate."
            )
        if database is None:
            database = keys_database()
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
            compensated = None
            if complete:
                completed = keys.complete_abandoned(status=status, all_stale=all, using=database)
            if compensate:
                compensated = compensate_abandoned(
                    scope=scope, key=key, status=status, using=database
                )
        except ValueError as exc:  # a bad status given through call_command()
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            raise CommandError(f"Could not read the keys: {exc}") from exc
        except IdempotencyStoreUnavailable as exc:  # taking a key over, to compensate it
            raise CommandError(f"Could not compensate: the store is unavailable ({exc}).") from exc
        listed = [_describe(row) for row in rows]
        if json:
            report: dict[str, Any] = {"count": count, "keys": listed}
            if completed is not None:
                report["completed"] = completed
            if compensated is not None:
                report["compensated"] = [vars(outcome) for outcome in compensated]
            self.stdout.write(dumps(report, indent=2))
        else:
            self._print(listed, count, all)
            if compensated is not None:
                self._print_compensated(compensated, status)
        if compensated is not None:
            failed = [outcome for outcome in compensated if outcome.outcome == "failed"]
            if failed:
                raise CommandError(
                    f"{len(failed):,} {_keys(len(failed))} could not be compensated "
                    f"({', '.join(f'{o.scope} {o.key!r}: {o.error}' for o in failed)}); "
                    "run the command again to resume their pending compensations."
                )
        if json:
            return
        if completed is not None:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Completed {completed:,} {_keys(completed)} without a response (original "
                    f"status {status}): retries get 409 and never run again."
                )
            )

    def _print_compensated(self, compensated: list[Compensation], status: int) -> None:
        for outcome in compensated:
            name = f"{outcome.scope} {outcome.key!r}"
            ran = ", ".join(outcome.ran) or "none"
            if outcome.outcome == "compensated":
                self.stdout.write(
                    self.style.SUCCESS(
                        f"Compensated {name} (ran: {ran}): finished without a response "
                        f"(original status {status}); retries get 409 and never run again."
                    )
                )
            elif outcome.outcome == "failed":
                pending = ", ".join(outcome.pending) or "none"
                self.stderr.write(
                    f"Could not compensate {name}: {outcome.error} (ran: {ran}; pending: "
                    f"{pending})."
                )
            elif outcome.outcome == "busy":
                self.stdout.write(
                    f"Skipped {name}: a live request, a retry or another compensation holds "
                    "it, or took it first."
                )
            else:
                self.stdout.write(
                    f"Skipped {name}: its phases declare no compensation (settle it by hand, "
                    "then use --complete)."
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
        "phases": [str(point[0]) for point in points],
        "created_at": row.created_at.isoformat(),
        "age_seconds": int((row.db_now - row.created_at).total_seconds()),
    }


def _keys(count: int) -> str:
    return "key" if count == 1 else "keys"


def _requests(count: int) -> str:
    return "request" if count == 1 else "requests"
