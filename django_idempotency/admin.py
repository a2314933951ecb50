"""A read-only admin for inspecting idempotency keys, releasing stuck ones and purging; and
for dead letters, re-driving them.

Built to stay fast on a table of millions of keys: no full-table count, filters and a search
served by the model's indexes, a date hierarchy that reads two index ends instead of scanning.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import uuid
from http import HTTPStatus
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.views.main import ORDER_VAR, ChangeList
from django.contrib.auth import get_permission_codename
from django.core.paginator import Paginator
from django.db.models import Max, Min, Q
from django.http import HttpRequest
from django.utils import formats, timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.http import parse_header_parameters
from django.utils.safestring import SafeString
from django.utils.text import Truncator, capfirst
from django.utils.timesince import timesince
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from django_idempotency.conf import conf
from django_idempotency.encryption import Unreadable, open_response
from django_idempotency.models import (
    DeadLetter,
    DeadLetterAlreadyRedriven,
    DeadLetterQuerySet,
    IdempotencyKey,
    IdempotencyKeyQuerySet,
    OutboxEvent,
)
from django_idempotency.records import StoredResponse

logger = logging.getLogger("django_idempotency")

#: Characters of a stored body shown on the detail page; the rest is cut off.
BODY_DISPLAY_LIMIT = 20_000
#: The changelist counts matching keys up to this many, never the whole table.
COUNT_LIMIT = 1_000
_JSON_TYPES = ("application/json", "application/problem+json")
_TEXT_TYPES = (
    "application/xml",
    "application/javascript",
    "application/x-www-form-urlencoded",
    "application/x-ndjson",
)
_UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
_PRE = "white-space: pre-wrap; overflow-wrap: anywhere; max-height: 40em; overflow: auto"


class CappedCountPaginator(Paginator):  # type: ignore[type-arg]
    """Counts up to :data:`COUNT_LIMIT` matches (``COUNT(*)`` over a ``LIMIT``), never more."""

    limit = COUNT_LIMIT

    @cached_property
    def count(self) -> int:
        return min(self._matches, self.limit)

    @cached_property
    def capped(self) -> bool:
        """Whether more keys match than the count says."""
        return self._matches > self.limit

    @cached_property
    def _matches(self) -> int:
        # Without ORDER BY: the database may count along whichever index serves the filters.
        queryset: Any = self.object_list
        matches: int = queryset.order_by()[: self.limit + 1].count()
        return matches


class IdempotencyKeyChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> Any:
        # The list shows none of the stored response: don't fetch up to a megabyte per row.
        queryset = super().get_queryset(request, exclude_parameters)
        return queryset.defer("response_headers", "response_body")

    def get_ordering_field(self, field_name: Any) -> Any:
        # ``?o=`` numbers the columns of ``list_display``, and Django sorts by any of them that
        # maps to a field, whether ``sortable_by`` offers it or not: the URL would sort by
        # columns the list does not sort (and whole tables with them). Only those it offers.
        if self.sortable_by is not None and field_name not in self.sortable_by:
            return None
        return super().get_ordering_field(field_name)

    def get_ordering(self, request: HttpRequest, queryset: Any) -> list[Any]:
        if (
            self.params.get(ExpiryFilter.parameter_name) == "expired"
            and ORDER_VAR not in self.params
        ):
            # Expired keys are the oldest ones: "newest first" would walk the index past every
            # live key before it found one. "Most recently expired first" reads the expiry index.
            return ["-expires_at", "-pk"]
        ordering: list[Any] = super().get_ordering(request, queryset)
        return ordering

    @cached_property
    def date_range(self) -> tuple[datetime.datetime | None, datetime.datetime | None]:
        """When the first and the last key were created: the two ends of the ``created_at`` index.

        The filters are left out on purpose: with them, the first or last match may lie far
        from the ends of the index (the newest expired key is behind every live one).
        """
        bounds = self.root_queryset.aggregate(first=Min("created_at"), last=Max("created_at"))
        return _local(bounds["first"]), _local(bounds["last"])

    @cached_property
    def date_hierarchy_links(self) -> dict[str, Any]:
        """What ``admin/date_hierarchy.html`` shows, without ``SELECT DISTINCT`` over dates.

        Django's own date hierarchy lists the years, months or days that have matching rows,
        with a ``DISTINCT`` query over every one of them. This lists every year, month or day
        between the first and the last key instead: some may list no key.
        """
        field = str(self.date_hierarchy)
        names = {part: f"{field}__{part}" for part in ("year", "month", "day")}
        year, month, day = (self.params.get(names[part]) for part in ("year", "month", "day"))
        first, last = self.date_range
        if not (year or month or day) and first and last and first.year == last.year:
            year = str(first.year)
            if first.month == last.month:
                month = str(first.month)
        links: dict[str, Any] = {
            "show": True,
            "field_name": getattr(IdempotencyKey._meta.get_field(field), "verbose_name", field),
            "back": None,
            "choices": [],
        }

        def link(filters: dict[str, Any]) -> str:
            query_string: str = self.get_query_string(filters, [f"{field}__"])
            return query_string

        span = (first.date(), last.date()) if first and last else None
        if year and month and day:
            date = datetime.date(int(year), int(month), int(day))
            links["back"] = {
                "link": link({names["year"]: year, names["month"]: month}),
                "title": capfirst(formats.date_format(date, "YEAR_MONTH_FORMAT")),
            }
            links["choices"] = [{"title": capfirst(formats.date_format(date, "MONTH_DAY_FORMAT"))}]
        elif year and month:
            links["back"] = {"link": link({names["year"]: year}), "title": year}
            links["choices"] = [
                {
                    "link": link({names["year"]: year, names["month"]: month, names["day"]: d.day}),
                    "title": capfirst(formats.date_format(d, "MONTH_DAY_FORMAT")),
                }
                for d in _days(int(year), int(month), span)
            ]
        elif year:
            links["back"] = {"link": link({}), "title": _("All dates")}
            links["choices"] = [
                {
                    "link": link({names["year"]: year, names["month"]: d.month}),
                    "title": capfirst(formats.date_format(d, "YEAR_MONTH_FORMAT")),
                }
                for d in _months(int(year), span)
            ]
        elif span:
            links["choices"] = [
                {"link": link({names["year"]: str(y)}), "title": str(y)}
                for y in range(span[0].year, span[1].year + 1)
            ]
        return links


def _days(
    year: int, month: int, span: tuple[datetime.date, datetime.date] | None
) -> list[datetime.date]:
    """The days of ``month`` within ``span``."""
    if span is None:
        return []
    start = datetime.date(year, month, 1)
    end = (start + datetime.timedelta(days=31)).replace(day=1) - datetime.timedelta(days=1)
    low, high = max(start, span[0]), min(end, span[1])
    return [low + datetime.timedelta(days=n) for n in range((high - low).days + 1)]


def _months(year: int, span: tuple[datetime.date, datetime.date] | None) -> list[datetime.date]:
    """The first days of the months of ``year`` within ``span``."""
    if span is None:
        return []
    return [
        datetime.date(year, month, 1)
        for month in range(1, 13)
        if (span[0].year, span[0].month) <= (year, month) <= (span[1].year, span[1].month)
    ]


def _local(value: datetime.datetime | None) -> datetime.datetime | None:
    if value is not None and timezone.is_aware(value):
        return timezone.localtime(value)
    return value


# -- Filters: each one is served by an index, or by walking the newest keys first ----------


class StateFilter(admin.SimpleListFilter):
    title = _("state")
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("in_progress", _("in progress")),
            ("stale", _("in progress, stale")),
            ("completed", _("completed")),
        ]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        value = self.value()
        if value == "stale":
            return queryset.stale()
        if value in ("in_progress", "completed"):
            return queryset.filter(state=value)
        return queryset


class StatusClassFilter(admin.SimpleListFilter):
    title = _("response status")
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(f"{digit}xx", f"{digit}xx") for digit in range(1, 6)]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        value = self.value()
        if value and value[0] in "12345" and value[1:] == "xx":
            low = int(value[0]) * 100
            return queryset.filter(response_status__gte=low, response_status__lt=low + 100)
        return queryset


class ExpiryFilter(admin.SimpleListFilter):
    title = _("expiry")
    parameter_name = "expiry"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("live", _("live")), ("expired", _("expired"))]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        value = self.value()
        if value == "live":
            return queryset.live()
        if value == "expired":
            return queryset.expired()
        return queryset


class MethodFilter(admin.SimpleListFilter):
    """The covered methods, without ``SELECT DISTINCT method`` over the whole table."""

    title = _("method")
    parameter_name = "method"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        try:
            configured = set(conf.IDEMPOTENCY_METHODS)
        except (TypeError, AttributeError):  # a malformed setting: reported by check E003
            configured = set()
        methods = sorted(configured.union(_UNSAFE_METHODS))
        return [(method, method) for method in methods]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        # Only a method the filter offers, as the other filters ignore values they do not
        # offer: any other string went to the database as it came (PostgreSQL refuses a NUL).
        value = self.value()
        offered = {method for method, _title in self.lookup_choices}
        return queryset.filter(method=value) if value in offered else queryset


# -- The admins ----------------------------------------------------------------------------------


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """What both admins share: nothing is added, edited or deleted one by one, and the list
    takes no URL lookup but the ones its own links carry."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Never Django's own deletes: a key's "Delete" button or the "delete selected" action
        # would delete keys that live requests hold, in one unbatched statement.
        return False

    def has_model_permission(self, request: HttpRequest, action: str) -> bool:
        """Whether the user has the model's ``action`` permission (``"delete"``, ``"change"``)."""
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        """Only the parameters that the list's own links carry: its filters and its dates.

        Django allows a URL lookup on any of the model's own fields (``?response_body__contains=``,
        ``?recovery_points__0__1__charge=``): a user who may not see stored responses could
        find them out one guess at a time, from which keys the list shows. A lookup refused
        here is Django's ``DisallowedModelAdminLookup``, a 400 response. Search (``q``), sorting
        (``o``) and the page (``p``) are not lookups: each is restricted where it is used.
        """
        allowed: set[str] = set()
        prefixes: list[str] = []
        for item in self.get_list_filter(request):
            if isinstance(item, type) and issubclass(item, admin.SimpleListFilter):
                allowed.add(str(item.parameter_name))
                continue
            field = item[0] if isinstance(item, (list, tuple)) else item
            if isinstance(field, str):
                # A field filter that a subclass adds: its parameters (``scope__exact``,
                # ``scope__isnull``...) all start with the field that the subclass chose.
                prefixes.append(f"{field}__")
        if self.date_hierarchy:
            allowed.update(f"{self.date_hierarchy}__{part}" for part in ("year", "month", "day"))
        return lookup in allowed or lookup.startswith(tuple(prefixes))


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(ReadOnlyAdmin):
    """Look at keys and their stored responses; release stuck keys; purge expired ones.

    Nothing can be added or edited, and a single key cannot be deleted from its page: a key
    that a live request holds must never disappear under it. The two actions delete only
    what is safe to delete, with the same queryset methods as ``purge_idempotency_keys``.
    Stored responses (headers and body) are shown only to users with the model's view
    permission; a user who reaches the admin through the change permission alone sees
    everything else.
    """

    list_display = (
        "key",
        "scope",
        "method",
        "short_path",
        "state",
        "status",
        "created_at",
        "expires_at",
        "age",
    )
    list_display_links = ("key",)
    list_filter = (StateFilter, StatusClassFilter, ExpiryFilter, MethodFilter)
    # Sorting by an unindexed column would sort the whole table.
    sortable_by = ("created_at", "expires_at", "age")
    ordering = ("-created_at",)
    date_hierarchy = "created_at"
    search_fields = ("key", "scope", "path")
    search_help_text = _(
        "A key or a scope, exactly as stored (for example user:42); or the start of a path, "
        "beginning with /."
    )
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = CappedCountPaginator
    list_per_page = 50
    actions = ("purge_expired", "release_stale")

    readonly_fields = (
        "key",
        "scope",
        "state",
        "method",
        "path",
        "fingerprint_display",
        "created_at",
        "completed_at",
        "expires_at",
        "expiry",
        "lease_until",
        "owner_token",
        "status_display",
        "headers_table",
        "body_display",
        "stored_response_hidden",
        "phases_display",
        "phases_table",
    )

    def has_purge_permission(self, request: HttpRequest) -> bool:
        """The two actions, which delete only what is safe, need the model's delete permission."""
        return self.has_model_permission(request, "delete")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return IdempotencyKeyChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: Any, search_term: str
    ) -> tuple[Any, bool]:
        """One term: a path prefix when it starts with ``/``, else an exact key or scope.

        Exact matches use the key index and the (scope, key) unique index. Django's default
        search (``icontains``, or ``iexact`` / ``istartswith``) wraps the column in ``UPPER()``
        and can use no index at all.
        """
        term = search_term.strip()
        if not term:
            return queryset, False
        if term.startswith("/"):
            return queryset.filter(path__startswith=term), False
        return queryset.filter(Q(key=term) | Q(scope=term)), False

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        response: tuple[str, ...]
        if self._may_see_stored_response(request):
            response = ("status_display", "headers_table", "body_display")
            phases = "phases_table"
        else:
            response = ("status_display", "stored_response_hidden")
            phases = "phases_display"
        return (
            (None, {"fields": ("key", "scope", "state", "method", "path", "fingerprint_display")}),
            (
                _("Timing"),
                {"fields": ("created_at", "completed_at", "expires_at", "expiry", "lease_until")},
            ),
            (_("Stored response"), {"fields": response}),
            (_("Phases"), {"fields": (phases,)}),
            (_("Internals"), {"fields": ("owner_token",), "classes": ("collapse",)}),
        )

    def _may_see_stored_response(self, request: HttpRequest) -> bool:
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.{get_permission_codename('view', opts)}")

    # Columns.

    @admin.display(description=_("path"))
    def short_path(self, obj: IdempotencyKey) -> str:
        return Truncator(obj.path).chars(60)

    @admin.display(description=_("status"))
    def status(self, obj: IdempotencyKey) -> int | None:
        return obj.response_status

    @admin.display(description=_("age"), ordering="-created_at")
    def age(self, obj: IdempotencyKey) -> str:
        return timesince(obj.created_at, depth=1)

    # The detail page.

    @admin.display(description=_("request fingerprint"))
    def fingerprint_display(self, obj: IdempotencyKey) -> SafeString:
        return format_html("<code>{}</code>", obj.fingerprint)

    @admin.display(description=_("expiry"))
    def expiry(self, obj: IdempotencyKey) -> str:
        now = timezone.now()
        if obj.expires_at <= now:
            return str(_("expired %(time)s ago") % {"time": timesince(obj.expires_at, now)})
        return str(_("live for another %(time)s") % {"time": timesince(now, obj.expires_at)})

    @admin.display(description=_("response status"))
    def status_display(self, obj: IdempotencyKey) -> str:
        status = obj.response_status
        if status is None:
            return str(_("None yet: the request has not finished."))
        try:
            return f"{status} {HTTPStatus(status).phrase}"
        except ValueError:
            return str(status)

    @admin.display(description=_("response headers"))
    def headers_table(self, obj: IdempotencyKey) -> SafeString | str:
        stored = readable_response(obj)
        if stored is None:
            return str(CANNOT_DECRYPT)
        headers = stored.headers
        if not headers:
            return str(_("None stored."))
        rows = format_html_join(
            "\n",
            '<tr><th scope="row">{}</th><td><code>{}</code></td></tr>',
            ((name, value) for name, value in headers),
        )
        return format_html("<table>{}</table>", rows)

    @admin.display(description=_("recovery points"))
    def phases_display(self, obj: IdempotencyKey) -> str:
        """Each committed phase's name, in order (their results can hold personal data)."""
        points = obj.recovery_points or []
        if not points:
            return str(_("None: the request committed no phase."))
        return ", ".join(str(point[0]) for point in points)

    @admin.display(description=_("recovery points"))
    def phases_table(self, obj: IdempotencyKey) -> SafeString | str:
        """Each committed phase, in order, with its stored result."""
        points = obj.recovery_points or []
        if not points:
            return self.phases_display(obj)
        rows = format_html_join(
            "",
            "<tr><th>{}</th><td><code>{}</code></td></tr>",
            ((point[0], json.dumps(point[1], ensure_ascii=False)) for point in points),
        )
        return format_html("<table>{}</table>", rows)

    @admin.display(description=_("response body"))
    def body_display(self, obj: IdempotencyKey) -> SafeString | str:
        return render_body(obj)

    @admin.display(description=_("stored response"))
    def stored_response_hidden(self, obj: IdempotencyKey) -> str:
        return str(
            _(
                "Hidden: stored responses can hold personal data, and only users with the "
                "“Can view idempotency key” permission see them."
            )
        )

    # Actions.

    @admin.action(description=_("Purge the selected expired keys"), permissions=["purge"])
    def purge_expired(self, request: HttpRequest, queryset: IdempotencyKeyQuerySet) -> None:
        deleted = queryset.purge()
        self.message_user(
            request,
            ngettext(
                "Deleted %(count)s expired key.",
                "Deleted %(count)s expired keys.",
                deleted,
            )
            % {"count": formats.number_format(deleted, force_grouping=True)},
            messages.SUCCESS if deleted else messages.WARNING,
        )
        self._report_kept(
            request,
            queryset,
            _("Kept %(count)s selected key: not expired yet, or in use by a request."),
            _("Kept %(count)s selected keys: not expired yet, or in use by a request."),
        )

    @admin.action(
        description=_("Release the selected stuck keys (lease passed, request gone)"),
        permissions=["purge"],
    )
    def release_stale(self, request: HttpRequest, queryset: IdempotencyKeyQuerySet) -> None:
        released = queryset.release_stale()
        self.message_user(
            request,
            ngettext(
                "Released %(count)s stuck key: its next request runs the view.",
                "Released %(count)s stuck keys: their next request runs the view.",
                released,
            )
            % {"count": formats.number_format(released, force_grouping=True)},
            messages.SUCCESS if released else messages.WARNING,
        )
        self._report_kept(
            request,
            queryset,
            _("Kept %(count)s selected key: completed, or held by a request still running."),
            _("Kept %(count)s selected keys: completed, or held by a request still running."),
        )

    def _report_kept(self, request: HttpRequest, queryset: Any, singular: Any, plural: Any) -> None:
        if request.POST.get("select_across") == "1":
            return  # counting "every matching key" is what this admin never does
        kept: int = queryset.count()  # the selection: at most one page of keys
        if kept:
            message = singular if kept == 1 else plural
            self.message_user(request, str(message) % {"count": kept}, messages.INFO)


class RedrivenFilter(admin.SimpleListFilter):
    title = _("re-driven")
    parameter_name = "redriven"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("no", _("not yet")), ("yes", _("re-driven"))]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        if self.value() == "no":
            return queryset.filter(redriven_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(redriven_at__isnull=False)
        return queryset


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    """Look at Celery deliveries that failed past their retries; re-drive them, once each.

    Nothing can be added, edited or deleted. The action re-drives with the same
    ``DeadLetter.objects.redrive()`` as ``idempotency_dead_letters --redrive``, and needs the
    model's change permission.
    """

    list_display = ("task_name", "key", "error", "created_at", "redriven_at")
    list_display_links = ("key",)
    list_filter = (RedrivenFilter,)
    sortable_by = ("created_at",)
    ordering = ("-created_at",)
    search_fields = ("key", "task_name")
    search_help_text = _("A key or a task name, exactly as stored.")
    show_facets = admin.ShowFacets.NEVER
    list_per_page = 50
    actions = ("redrive",)
    fields = (
        "task_name",
        "scope",
        "key",
        "task_id",
        "arguments",
        "error_type",
        "error_message",
        "created_at",
        "redriven_at",
    )
    readonly_fields = fields

    def has_redrive_permission(self, request: HttpRequest) -> bool:
        return self.has_model_permission(request, "change")

    def get_search_results(
        self, request: HttpRequest, queryset: Any, search_term: str
    ) -> tuple[Any, bool]:
        """One term, matched exactly against the key or the task name."""
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(key=term) | Q(task_name=term)), False

    @admin.display(description=_("error"))
    def error(self, obj: DeadLetter) -> str:
        return Truncator(f"{obj.error_type}: {obj.error_message}").chars(80)

    @admin.action(description=_("Re-drive the selected dead letters"), permissions=["redrive"])
    def redrive(self, request: HttpRequest, queryset: DeadLetterQuerySet) -> None:
        redriven = refused = failed = 0
        for pk in queryset.values_list("pk", flat=True):
            try:
                DeadLetter.objects.redrive(pk)
            except DeadLetterAlreadyRedriven:
                refused += 1
            except Exception:  # the broker's own errors, whatever its transport raises
                # The letter stays pending (re-driving rolled back): say so, not a 500.
                logger.exception("Could not re-drive dead letter %r.", pk)
                failed += 1
            else:
                redriven += 1
        if failed:
            self.message_user(
                request,
                ngettext(
                    "Could not publish %(count)s dead letter (is the broker reachable?); it "
                    "stays pending.",
                    "Could not publish %(count)s dead letters (is the broker reachable?); they "
                    "stay pending.",
                    failed,
                )
                % {"count": failed},
                messages.ERROR,
            )
        if redriven:
            self.message_user(
                request,
                ngettext(
                    "Re-drove %(count)s dead letter.", "Re-drove %(count)s dead letters.", redriven
                )
                % {"count": redriven},
                messages.SUCCESS,
            )
        if refused:
            self.message_user(
                request,
                ngettext(
                    "Skipped %(count)s dead letter re-driven already.",
                    "Skipped %(count)s dead letters re-driven already.",
                    refused,
                )
                % {"count": refused},
                messages.WARNING,
            )


#: What the page shows of a response that no key in IDEMPOTENCY_ENCRYPTION_KEYS decrypts.
CANNOT_DECRYPT = _("Encrypted: no key in IDEMPOTENCY_ENCRYPTION_KEYS can decrypt it.")


def readable_response(obj: IdempotencyKey) -> StoredResponse | None:
    """A key's stored headers and body as stored, decrypted when they were encrypted;
    ``None`` when no configured key can decrypt them (the page never shows ciphertext)."""
    stored = StoredResponse(
        status=obj.response_status or 0,
        headers=[(name, value) for name, value in obj.response_headers or []],
        body=None if obj.response_body is None else bytes(obj.response_body),
    )
    try:
        return open_response(stored, scope=obj.scope, key=obj.key)
    except Unreadable:
        return None


class OutboxStateFilter(admin.SimpleListFilter):
    title = _("state")
    parameter_name = "outbox_state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("pending", _("pending")),
            ("failing", _("pending, last attempt failed")),
            ("published", _("published")),
        ]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        if self.value() == "pending":
            return queryset.pending()
        if self.value() == "failing":
            return queryset.failing()
        if self.value() == "published":
            return queryset.published()
        return queryset


@admin.register(OutboxEvent)
class OutboxEventAdmin(ReadOnlyAdmin):
    """Look at the transactional outbox: what is pending, what failed and why, what went.

    Nothing can be added, edited or deleted: the relay publishes events, and
    ``OutboxEvent.objects.purge_published()`` (or the relay's ``--purge-older-than``) deletes
    them.
    """

    list_display = ("topic", "message_id", "state", "attempts", "created_at", "published_at")
    list_display_links = ("message_id",)
    list_filter = (OutboxStateFilter,)
    sortable_by = ()
    # Newest first along the primary key: no other index is needed for the list.
    ordering = ("-pk",)
    search_fields = ("topic", "message_id")
    search_help_text = _("A topic or a message id, exactly as stored.")
    show_facets = admin.ShowFacets.NEVER
    list_per_page = 50
    fields = (
        "topic",
        "message_id",
        "payload",
        "headers",
        "created_at",
        "available_at",
        "attempts",
        "last_error",
        "published_at",
    )
    readonly_fields = fields

    def get_search_results(
        self, request: HttpRequest, queryset: Any, search_term: str
    ) -> tuple[Any, bool]:
        """One term, matched exactly against the topic, or the message id when it is one."""
        term = search_term.strip()
        if not term:
            return queryset, False
        condition = Q(topic=term)
        with contextlib.suppress(ValueError):
            condition |= Q(message_id=uuid.UUID(term))
        return queryset.filter(condition), False

    @admin.display(description=_("state"))
    def state(self, obj: OutboxEvent) -> str:
        if obj.published_at is not None:
            return str(_("published"))
        if obj.last_error:
            return str(_("failing: %(error)s")) % {"error": Truncator(obj.last_error).chars(60)}
        return str(_("pending"))


def render_body(obj: IdempotencyKey) -> SafeString | str:
    """A stored body for people: JSON pretty-printed, text escaped and cut, binary as a size."""
    if obj.state != IdempotencyKey.State.COMPLETED:
        return str(_("None yet: the request has not finished."))
    if obj.response_body is None:
        return str(
            _(
                "Not stored: the response was streamed, or larger than "
                "IDEMPOTENCY_MAX_RESPONSE_SIZE (or IDEMPOTENCY_REDACT removed it). Retries get "
                "a problem response saying so."
            )
        )
    stored = readable_response(obj)
    if stored is None:
        return str(CANNOT_DECRYPT)
    body = stored.body or b""
    if not body:
        return str(_("Empty."))
    content_type = next(
        (value for name, value in stored.headers if name.lower() == "content-type"), ""
    )
    media_type, params = parse_header_parameters(content_type)
    text = _decode(body, params.get("charset", "utf-8"))
    if text is None or not (_is_text(media_type) or not media_type):
        size = formats.number_format(len(body), force_grouping=True)
        kind = f" ({media_type})" if media_type else ""
        return str(_("Binary, %(size)s bytes%(kind)s.") % {"size": size, "kind": kind})
    if media_type in _JSON_TYPES or media_type.endswith("+json"):
        # Not JSON after all (or nested too deeply to re-indent): shown as the text it is.
        with contextlib.suppress(ValueError, RecursionError):
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    shown = text[:BODY_DISPLAY_LIMIT]
    note = ""
    if len(text) > len(shown):
        note = str(
            _("Showing the first %(shown)s of %(total)s characters.")
            % {
                "shown": formats.number_format(len(shown), force_grouping=True),
                "total": formats.number_format(len(text), force_grouping=True),
            }
        )
    return format_html('<pre style="{}">{}</pre>{}', _PRE, shown, note)


def _is_text(media_type: str) -> bool:
    return (
        media_type.startswith("text/")
        or media_type in _JSON_TYPES
        or media_type in _TEXT_TYPES
        or media_type.endswith(("+json", "+xml"))
    )


def _decode(body: bytes, charset: str) -> str | None:
    """The body as text, or ``None`` when it is not text in ``charset``."""
    try:
        text = body.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return None
    if any(ord(char) < 32 and char not in "\t\n\r" for char in text):
        return None
    return text
