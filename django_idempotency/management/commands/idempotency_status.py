"""``manage.py idempotency_status``: the active configuration, the store's health, the checks."""

from __future__ import annotations

import json
import time
from typing import Any

from django.core import checks
from django.core.cache import caches
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django.db.models import Count
from django.utils.module_loading import import_string

from django_idempotency.conf import DEFAULTS, conf, get_store
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import NOT_MIGRATED, CacheStore, DatabaseStore, is_missing_schema


def _setting_names() -> list[str]:
    return sorted(DEFAULTS)


#: Settings whose values are secrets: the report counts their items and never shows them.
_SECRETS = frozenset({"IDEMPOTENCY_ENCRYPTION_KEYS"})


def _show(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_show(item) for item in value]
    return str(value)


def _database_health() -> dict[str, Any]:
    store: Any = get_store()
    alias: str = store._alias()  # the alias the store itself uses (a subclass may pin one)
    health: dict[str, Any] = {"kind": "database", "alias": alias}
    try:
        started = time.monotonic()
        keys = IdempotencyKey.objects.using(alias)
        states = dict(keys.order_by().values_list("state").annotate(count=Count("pk")))
        health["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
        health["keys"] = {state: states.get(state, 0) for state in IdempotencyKey.State.values}
        health["expired"] = keys.expired().count()
    except DatabaseError as exc:
        error = f"{type(exc).__name__}: {exc}".strip()
        if is_missing_schema(exc):
            error = f"{NOT_MIGRATED.format(alias=alias)} ({error})"
        health.update(ok=False, error=error)
    else:
        health["ok"] = True
    return health


def _cache_health(alias: str, kind: str) -> dict[str, Any]:
    health: dict[str, Any] = {"kind": kind, "alias": alias}
    try:
        cache: Any = caches[alias]
        started = time.monotonic()
        client = getattr(cache, "client", None)
        if client is not None and hasattr(client, "get_client"):
            client.get_client(write=True).ping()  # django-redis: a real PING
        else:
            cache.get("django_idempotency:status")
        health["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    except Exception as exc:  # any backend's connection error
        health.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    else:
        health["ok"] = True
    return health


class Command(BaseCommand):
    help = (
        "Show django-idempotency's active settings (marking those not at their default), the "
        "store's and the replay cache's health, and the app's system check messages. Exits "
        "with status 1 when the store cannot be reached."
    )
    requires_system_checks: list[str] = []  # the checks are part of the report

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *, json: bool, verbosity: int, **options: Any) -> None:
        report = self.report()
        if json:
            self.stdout.write(_dumps(report))
        elif verbosity > 0:
            self.print_report(report)
        if not report["store"]["ok"]:
            raise CommandError(f"The idempotency store is unreachable: {report['store']['error']}")

    def report(self) -> dict[str, Any]:
        settings_report = {
            name: {
                "value": _show(value),
                "repr": repr(value),
                "default": value == conf.default(name),
            }
            for name, value in ((name, getattr(conf, name)) for name in _setting_names())
        }
        for name in _SECRETS:
            hidden = f"<{len(getattr(conf, name))} keys, not shown>"
            settings_report[name].update(value=hidden, repr=hidden)
        store_path = conf.IDEMPOTENCY_STORE
        store_class: Any = None
        try:
            store_class = import_string(store_path)
        except ImportError as exc:
            store = {"kind": "unknown", "ok": False, "error": f"{store_path}: {exc}"}
        if isinstance(store_class, type) and issubclass(store_class, CacheStore):
            store = _cache_health(store_class.alias or conf.IDEMPOTENCY_STORE_CACHE, "cache")
        elif isinstance(store_class, type) and issubclass(store_class, DatabaseStore):
            store = _database_health()
        elif store_class is not None:
            store = {"kind": "custom", "ok": True, "note": "health not measured"}
        store["class"] = store_path
        replay_alias = conf.IDEMPOTENCY_REPLAY_CACHE
        replay = None
        if isinstance(replay_alias, str):
            replay = _cache_health(replay_alias, "cache")
        messages = [
            {
                "id": message.id,
                "level": _level(message),
                "message": message.msg,
                "hint": message.hint,
            }
            for message in checks.run_checks(include_deployment_checks=False)
            if (message.id or "").startswith("django_idempotency.")
        ]
        return {
            "settings": settings_report,
            "store": store,
            "replay_cache": replay,
            "checks": messages,
        }

    def print_report(self, report: dict[str, Any]) -> None:
        style, write = self.style, self.stdout.write
        write(style.MIGRATE_HEADING("Settings") + " (* not the default)")
        for name, entry in report["settings"].items():
            mark = " " if entry["default"] else "*"
            write(f" {mark} {name} = {entry['repr']}")
        write(style.MIGRATE_HEADING("Store"))
        self._print_health(report["store"])
        write(style.MIGRATE_HEADING("Replay cache"))
        if report["replay_cache"] is None:
            write("  off (IDEMPOTENCY_REPLAY_CACHE = None)")
        else:
            self._print_health(report["replay_cache"])
        write(style.MIGRATE_HEADING("System checks"))
        if not report["checks"]:
            write(style.SUCCESS("  no issues"))
        for message in report["checks"]:
            paint = style.ERROR if message["level"] == "error" else style.WARNING
            write(paint(f"  {message['id']}: {message['message']}"))
            if message["hint"]:
                write(f"    HINT: {message['hint']}")

    def _print_health(self, health: dict[str, Any]) -> None:
        style, write = self.style, self.stdout.write
        where = f" ({health['alias']})" if "alias" in health else ""
        write(f"  {health.get('class', health['kind'])}{where}")
        if not health["ok"]:
            write(style.ERROR(f"  unreachable: {health['error']}"))
            return
        latency = f" in {health['latency_ms']} ms" if "latency_ms" in health else ""
        write(style.SUCCESS(f"  reachable{latency}"))
        if "keys" in health:
            counts = ", ".join(f"{state} {count:,}" for state, count in health["keys"].items())
            write(f"  keys: {counts}; expired {health['expired']:,}")
        if "note" in health:
            write(f"  {health['note']}")


def _level(message: checks.CheckMessage) -> str:
    if message.level >= checks.ERROR:
        return "error"
    return "warning" if message.level >= checks.WARNING else "info"


def _dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
