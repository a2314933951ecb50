"""Conditional updates (RFC 9110): entity tags of a resource's version, ``If-Match``, the
compare-and-set that checks and increments the version in one ``UPDATE``, and ``@conditional``,
which applies them to a function view."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import wraps
from inspect import iscoroutinefunction
from typing import Any, TypeVar

from django.core.exceptions import (
    FieldDoesNotExist,
    FieldError,
    ImproperlyConfigured,
    ValidationError,
)
from django.db import models, router, transaction
from django.db.models import F
from django.http import HttpResponse
from django.http.response import HttpResponseBase

from django_idempotency.conf import InvalidValue, describe, validate_bool, validate_methods
from django_idempotency.exceptions import (
    IdempotencyPreconditionFailed,
    IdempotencyPreconditionRequired,
    PreconditionError,
)

__all__ = [
    "IfMatch",
    "compare_and_set",
    "conditional",
    "format_etag",
    "parse_if_match",
    "precondition_response",
]

_T = TypeVar("_T")

#: The methods ``@conditional`` and ``ConditionalUpdateMixin`` make conditional by default.
CONDITIONAL_METHODS = ("PUT", "PATCH", "DELETE")

# RFC 9110 section 8.8.3: entity-tag = [ weak ] opaque-tag; opaque-tag = DQUOTE *etagc DQUOTE;
# etagc = %x21 / %x23-7E / obs-text. A comma is an etagc, so a list is split by this pattern,
# never by commas.
_ENTITY_TAG = re.compile(r'[ \t]*(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|$)')


def format_etag(version: int, *, pk: object = None) -> str:
    """The strong entity tag of ``version``: ``"3"``, or ``"42.3"`` with the primary key."""
    return f'"{version}"' if pk is None else f'"{pk}.{version}"'


@dataclass(frozen=True)
class IfMatch:
    """A parsed ``If-Match`` header: ``*``, or the strong entity tags it lists.

    Weak tags are dropped as they are read: RFC 9110 section 13.1.1 compares ``If-Match``
    strongly, so a weak tag never matches. A malformed header matches nothing.
    """

    any: bool = False
    tags: frozenset[str] = frozenset()

    def matches(self, etag: str) -> bool:
        """Whether the current representation's (strong) ``etag`` passes this precondition."""
        return self.any or etag in self.tags


def parse_if_match(value: str | None) -> IfMatch | None:
    """The ``If-Match`` header ``value`` parsed; ``None`` when there is no header.

    Repeated headers arrive joined by commas (as WSGI and ASGI servers join them), which is
    the same list.
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if value == "*":
        return IfMatch(any=True)
    tags: set[str] = set()
    position = 0
    while position < len(value):
        match = _ENTITY_TAG.match(value, position)
        if match is None:
            return IfMatch()  # malformed (or "*" inside a list): it matches nothing
        if match.group(1) is None:
            tags.add(match.group(2))
        position = match.end()
    return IfMatch(tags=frozenset(tags))


def compare_and_set(
    queryset_or_model: models.QuerySet[Any] | type[models.Model],
    pk: object,
    expected_version: int | None,
    version_field: str = "version",
) -> int:
    """Check that row ``pk`` holds ``expected_version`` and increment it, in one ``UPDATE``.

    ``UPDATE ... SET version = version + 1 WHERE pk = %s AND version = %s``: the database
    compares and writes under the row lock the ``UPDATE`` takes, so of two writers expecting
    the same version exactly one succeeds, and the lock is held until the caller's
    transaction ends, so the rest of its write cannot interleave with another writer's.
    Call it inside ``transaction.atomic()`` together with that write.

    ``expected_version=None`` accepts any version (``If-Match: *``, or no precondition).
    Returns the new version; raises :class:`IdempotencyPreconditionFailed` when the row does
    not hold ``expected_version`` or no longer exists.
    """
    if isinstance(queryset_or_model, models.QuerySet):
        queryset = queryset_or_model
    else:
        queryset = queryset_or_model._default_manager.all()
    using = router.db_for_write(queryset.model)
    rows = queryset.using(using).filter(pk=pk)
    if expected_version is not None:
        rows = rows.filter(**{version_field: expected_version})
    with transaction.atomic(using=using):
        if not rows.update(**{version_field: F(version_field) + 1}):
            raise IdempotencyPreconditionFailed()
        if expected_version is not None:
            return expected_version + 1
        # The row is locked by the UPDATE above until the transaction ends: this read sees
        # the version it wrote, not one of another writer.
        version: int = rows.values_list(version_field, flat=True).get()
        return version


def precondition_response(exc: PreconditionError) -> HttpResponse:
    """The RFC 9457 problem+json response for a ``412`` or ``428``. Never stored."""
    return HttpResponse(
        json.dumps(exc.problem()), status=exc.status_code, content_type="application/problem+json"
    )


def refuse(request: Any, exc: PreconditionError) -> HttpResponse:
    """Answer ``exc`` (``412``/``428``) for ``request``: a key it claimed is freed, not stored.

    The answer is this layer's, given before the view wrote anything, like a view's own
    error: a retry with a fresh ``If-Match`` may use the same key.
    """
    run = getattr(request, "idempotency", None)  # set by @idempotent, the mixin, the middleware
    if run is not None:
        run.fail()
    return precondition_response(exc)


def conditional(
    model: type[models.Model] | models.QuerySet[Any],
    *,
    url_kwarg: str = "pk",
    lookup_field: str = "pk",
    version_field: str = "version",
    required: bool = False,
    methods: Iterable[str] = CONDITIONAL_METHODS,
    with_pk: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make a function view's updates of one object conditional on ``If-Match``.

    The object is the row of ``model`` (a model or a queryset) whose ``lookup_field`` is the
    URL's ``url_kwarg``. A ``GET`` or ``HEAD`` answered ``2xx`` carries the ``ETag`` of the
    version read *before* the view ran (so it is never newer than what the view shows). A
    request in ``methods`` (``PUT``, ``PATCH``, ``DELETE``) runs in one transaction: the
    version is checked against ``If-Match`` and incremented by one ``UPDATE``
    (:func:`compare_and_set`), then the view runs; a ``412``/``428`` is answered before the
    view, and a view's answer other than ``2xx`` rolls the increment back with the view's own
    writes. A ``2xx`` answer (other than to ``DELETE``) carries the new ``ETag``. A missing
    object (or a URL value the field cannot hold) is the view's to answer (its ``404``):
    preconditions are not evaluated then; but a view that answers ``2xx`` to a write with
    ``If-Match`` for an object ``model`` does not show is rolled back and answered ``412``.

    ``required=True`` answers ``428`` to such a request without ``If-Match``; ``with_pk``
    makes tags of the form ``"<pk>.<version>"``. Sync views only. Under ``@idempotent`` (put
    it above this decorator) a ``412``/``428`` is not stored and frees the key.
    """
    owner = "@conditional"
    queryset, model_class = _queryset(model, owner)
    for name, value in (
        ("url_kwarg", url_kwarg),
        ("lookup_field", lookup_field),
        ("version_field", version_field),
    ):
        if not isinstance(value, str) or not value:
            raise ImproperlyConfigured(
                f"{owner}: {name} must be a non-empty string, not {describe(value)}."
            )
    check_version_field(model_class, version_field, owner)
    try:
        queryset.values(lookup_field)  # resolves the field now, not at the first request
    except FieldError:
        raise ImproperlyConfigured(
            f"{owner}: lookup_field names {lookup_field!r}, which is not a field of "
            f"{model_class.__name__}."
        ) from None
    required = _option(owner, "required", validate_bool, required)
    with_pk = _option(owner, "with_pk", validate_bool, with_pk)
    covered = _option(owner, "methods", validate_methods, methods)
    if not covered or not covered <= set(CONDITIONAL_METHODS):
        raise ImproperlyConfigured(
            f"{owner}: methods must be some of PUT, PATCH and DELETE, not {sorted(covered)}."
        )

    def tag(pk: object, version: int) -> str:
        return format_etag(version, pk=pk if with_pk else None)

    def decorator(view_func: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(view_func):
            raise TypeError(f"@conditional(...) decorates a view, not {view_func!r}.")
        if iscoroutinefunction(view_func):
            raise TypeError(
                f"@conditional cannot wrap the async view {view_func.__qualname__}: the "
                "version check and the view's writes share one transaction, which Django's "
                "ORM holds in one thread. Make the view sync."
            )

        @wraps(view_func)
        def _view_wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
            if url_kwarg not in kwargs:
                raise ImproperlyConfigured(
                    f"@conditional on {view_func.__qualname__}: the URL gives no {url_kwarg!r} "
                    f"argument (it gives {sorted(kwargs)}); set url_kwarg."
                )
            using = router.db_for_write(model_class)
            lookup = {lookup_field: kwargs[url_kwarg]}
            method = request.method
            if method in ("GET", "HEAD"):
                current = _current(queryset.using(using), lookup, version_field)
                response = view_func(request, *args, **kwargs)
                if current is not None and _shows(response) and "ETag" not in response:
                    response["ETag"] = tag(*current)
                return response
            if method not in covered:
                return view_func(request, *args, **kwargs)
            header = request.headers.get("If-Match")
            if header is None and required:
                return refuse(request, IdempotencyPreconditionRequired())
            if_match = parse_if_match(header)
            with transaction.atomic(using=using):
                current = _current(queryset.using(using), lookup, version_field)
                if current is None:
                    response = view_func(request, *args, **kwargs)  # its 404
                    if if_match is not None and _shows(response):
                        # The view wrote an object that `model` does not show, so If-Match
                        # was never compared: as for an object that does not exist, it fails.
                        transaction.set_rollback(True, using=using)
                        return refuse(request, IdempotencyPreconditionFailed())
                    return response
                pk, version = current
                expected = None
                if if_match is not None and not if_match.any:
                    if not if_match.matches(tag(pk, version)):
                        return refuse(request, IdempotencyPreconditionFailed())
                    expected = version
                try:
                    version = compare_and_set(queryset, pk, expected, version_field)
                except IdempotencyPreconditionFailed as exc:
                    return refuse(request, exc)  # changed or deleted since it was read
                response = view_func(request, *args, **kwargs)
                if not _shows(response):
                    transaction.set_rollback(True, using=using)
                elif method != "DELETE" and "ETag" not in response:
                    response["ETag"] = tag(pk, version)
                return response

        return _view_wrapper

    return decorator


def _current(
    queryset: models.QuerySet[Any], lookup: dict[str, Any], version_field: str
) -> tuple[Any, int] | None:
    """The object's primary key and version; ``None`` when there is no such object, or when
    the URL's value cannot be one (``"abc"`` for an integer key), as the view's 404 says."""
    try:
        return queryset.filter(**lookup).values_list("pk", version_field).first()
    except (TypeError, ValueError, ValidationError):
        return None


def _shows(response: HttpResponseBase) -> bool:
    return 200 <= response.status_code < 300


def _queryset(model: object, owner: str) -> tuple[models.QuerySet[Any], type[models.Model]]:
    if isinstance(model, models.QuerySet):
        return model, model.model
    if isinstance(model, type) and issubclass(model, models.Model):
        return model._default_manager.all(), model
    raise ImproperlyConfigured(
        f"{owner}: the first argument must be a model class or a queryset, not {describe(model)}."
    )


def check_version_field(
    model: type[models.Model], name: str, owner: str, option: str = "version_field"
) -> None:
    """``ImproperlyConfigured`` unless ``model`` has the integer field ``name`` (set by
    ``owner``'s ``option``) to hold its version."""
    try:
        field = model._meta.get_field(name)
    except FieldDoesNotExist:
        raise ImproperlyConfigured(
            f"{owner}: {model.__name__} has no field {name!r} to hold its version; add a "
            f"PositiveIntegerField(default=1) or set {option}."
        ) from None
    if field.get_internal_type() not in _INTEGER_FIELDS:
        raise ImproperlyConfigured(
            f"{owner}: {model.__name__}.{name} must be an integer field to hold a version, "
            f"not a {type(field).__name__}."
        )


_INTEGER_FIELDS = frozenset(
    {
        "IntegerField",
        "BigIntegerField",
        "SmallIntegerField",
        "PositiveIntegerField",
        "PositiveBigIntegerField",
        "PositiveSmallIntegerField",
    }
)


def _option(owner: str, name: str, validate: Callable[[object], _T], value: object) -> _T:
    try:
        return validate(value)
    except InvalidValue as exc:
        hint = f" {exc.hint}" if exc.hint else ""
        raise ImproperlyConfigured(f"{owner}: {name} {exc.problem}{hint}") from None
