"""``manage.py idempotency_dead_letters``: list Celery dead letters, or re-drive one."""

from __future__ import annotations

from json import dumps
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from django_idempotency.models import DeadLetter, DeadLetterAlreadyRedriven

#: At most this many letters are listed (the count is always exact).
LIMIT = 100


class Command(BaseCommand):
    help = (
        "List the Celery task deliveries that failed past their retries (dead letters), newest "
        "first. With --redrive ID, publish that letter's task again with its task id and "
        "arguments, once: a letter re-driven already is refused."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--redrive",
            type=int,
            metavar="ID",
            help="Re-drive the dead letter with this id (as listed).",
        )
        parser.add_argument(
            "--pending", action="store_true", help="Only letters not re-driven yet."
        )
        parser.add_argument("--json", action="store_true", help="Print JSON.")

    def handle(self, *, redrive: int | None, pending: bool, json: bool, **options: Any) -> None:
        if redrive is not None:
            self._redrive(redrive, json)
            return
        letters = DeadLetter.objects.all()
        if pending:
            letters = letters.pending()
        try:
            rows = list(letters.order_by("-created_at", "-pk")[:LIMIT])
            count = letters.count()
        except DatabaseError as exc:
            raise CommandError(f"Could not read the dead letters: {exc}") from exc
        listed = [_describe(row) for row in rows]
        if json:
            self.stdout.write(dumps({"count": count, "dead_letters": listed}, indent=2))
            return
        if not listed:
            self.stdout.write("No dead letters.")
            return
        self.stdout.write(f"{count:,} dead {_letters(count)}:")
        for entry in listed:
            state = f"re-driven {entry['redriven_at']}" if entry["redriven_at"] else "pending"
            self.stdout.write(
                f"  #{entry['id']} {entry['task_name']} key {entry['key']!r} "
                f"(task id {entry['task_id']}): {entry['error_type']}: "
                f"{entry['error_message'][:200]} [{entry['created_at']}, {state}]"
            )
        if count > len(listed):
            self.stdout.write(f"  ... and {count - len(listed):,} more.")

    def _redrive(self, pk: int, json: bool) -> None:
        try:
            letter = DeadLetter.objects.redrive(pk)
        except DeadLetterAlreadyRedriven as exc:
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            raise CommandError(f"Could not re-drive dead letter {pk}: {exc}") from exc
        if json:
            self.stdout.write(dumps({"redriven": _describe(letter)}, indent=2))
            return
        self.stdout.write(
            self.style.SUCCESS(
                f"Re-drove dead letter #{letter.pk}: {letter.task_name} with task id "
                f"{letter.task_id} (key {letter.key!r})."
            )
        )


def _describe(row: DeadLetter) -> dict[str, Any]:
    return {
        "id": row.pk,
        "scope": row.scope,
        "key": row.key,
        "task_name": row.task_name,
        "task_id": row.task_id,
        "arguments": row.arguments,
        "error_type": row.error_type,
        "error_message": row.error_message,
        "created_at": row.created_at.isoformat(),
        "redriven_at": row.redriven_at.isoformat() if row.redriven_at else None,
    }


def _letters(count: int) -> str:
    return "letter" if count == 1 else "letters"
