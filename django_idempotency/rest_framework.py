"""``IdempotentMixin`` for DRF ``APIView``s and viewsets: a thin shell over ``adapters``;
``ConditionalUpdateMixin``, ``ETag`` and ``If-Match`` over ``conditional``.

The only module that imports Django REST Framework.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import router, transaction
from django.http import HttpResponse
from django.http.response import HttpResponseBase
from rest_framework.request import Request
from rest_framework.views import APIView

from django_idempotency.adapters import Execution, Options, option_error
from django_idempotency.conditional import (
    check_version_field,
    compare_and_set,
    format_etag,
    parse_if_match,
    precondition_response,
)
from django_idempotency.conf import InvalidValue, describe, validate_bool
from django_idempotency.exceptions import (
    IdempotencyError,
    IdempotencyPreconditionFailed,
    IdempotencyPreconditionRequired,
    PreconditionError,
)
from django_idempotency.http import error_response

__all__ = ["ConditionalUpdateMixin", "IdempotentMixin"]

_OPTION_NAMES = ("required", "ttl", "methods", "atomic", "wait", "stored_statuses")


def _class_name(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Answered(Exception):
    """Carries the answer ``begin()`` gave instead of the view (a replay, or a problem
    response) from ``initial()`` to ``handle_exception()``."""

    def __init__(self, response: HttpResponse) -> None:
        super().__init__("answered")
        self.response = response


class IdempotentMixin:
    """Protect a DRF ``APIView`` or viewset with ``Idempotency-Key``.

    List it before DRF's class: ``class OrderViewSet(IdempotentMixin, ModelViewSet)``. The key
    is claimed in ``initial()``, after authentication, so the default scope is the user DRF
    authenticated. Errors of this layer answer problem+json, as in plain Django views.

    Per-view attributes (``None`` follows the ``IDEMPOTENCY_*`` setting): ``idempotency_required``,
    ``idempotency_ttl``, ``idempotency_methods``, ``idempotency_atomic``, ``idempotency_wait``,
    ``idempotency_stored_statuses``.
    """

    idempotency_required: bool | None = None
    idempotency_ttl: timedelta | None = None
    idempotency_methods: Iterable[str] | None = None
    idempotency_atomic: bool | None = None
    idempotency_wait: timedelta | None = None
    idempotency_stored_statuses: Iterable[str | int] | None = None

    _idempotency: Execution | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._idempotency_class_options()  # a wrong type or value fails at import
        mro = cls.__mro__
        if APIView in mro and mro.index(APIView) < mro.index(IdempotentMixin):
            bases = ", ".join(
                base.__name__ for base in cls.__bases__ if base is not IdempotentMixin
            )
            raise TypeError(
                f"{cls.__name__}: list IdempotentMixin before DRF's view class, as in "
                f"class {cls.__name__}(IdempotentMixin, {bases})."
            )

    @classmethod
    def as_view(cls, *args: Any, **initkwargs: Any) -> Any:
        # initkwargs may set the options too (OrderView.as_view(idempotency_required=True)):
        # check them with the class's own, before any request arrives.
        cls._idempotency_class_options(initkwargs)
        return super().as_view(*args, **initkwargs)  # type: ignore[misc]

    @classmethod
    def _idempotency_class_options(cls, overrides: dict[str, Any] | None = None) -> Options:
        """The options the class's attributes (or ``overrides``) set, validated."""
        values = {
            name: (overrides or {}).get(f"idempotency_{name}", getattr(cls, f"idempotency_{name}"))
            for name in _OPTION_NAMES
        }
        return Options(**values, owner=_class_name(cls), prefix="idempotency_")

    def get_idempotency_options(self) -> Options:
        """The view's options, from its ``idempotency_*`` attributes. Override it to compute
        them; it runs at the start of ``dispatch()``, before DRF initialises the request."""
        values = {name: getattr(self, f"idempotency_{name}") for name in _OPTION_NAMES}
        return Options(**values, owner=_class_name(type(self)), prefix="idempotency_")

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponseBase:
        # The atomic mode's transaction, if any, opens inside the execution once initial()
        # has claimed the key, and closes here when dispatch() is done.
        with Execution(self.get_idempotency_options()) as execution:
            self._idempotency = execution
            return super().dispatch(request, *args, **kwargs)  # type: ignore[misc,no-any-return]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        assert self._idempotency is not None
        answer = self._idempotency.begin(request)
        if answer is not None:
            raise _Answered(answer)

    def handle_exception(self, exc: Exception) -> HttpResponseBase:
        if isinstance(exc, _Answered):
            return exc.response
        if isinstance(exc, PreconditionError):
            # ConditionalUpdateMixin refused the update before it wrote: like a view's own
            # error, store nothing and free the key (a retry with a fresh If-Match may use it).
            assert self._idempotency is not None
            self._idempotency.fail()
            return precondition_response(exc)
        if isinstance(exc, IdempotencyError):  # raised by the view: a phase's store failed
            return error_response(exc)
        if self._idempotency is not None:
            # The view raised (DRF turns most exceptions into responses): store nothing and
            # free the key, so a corrected retry may reuse it.
            self._idempotency.fail()
        return super().handle_exception(exc)  # type: ignore[misc,no-any-return]

    def finalize_response(
        self, request: Request, response: HttpResponseBase, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        if self._idempotency is None:
            return response
        return self._idempotency.finish(request, response)


class ConditionalUpdateMixin:
    """Conditional updates for a DRF generic view or viewset (RFC 9110 ``ETag``/``If-Match``).

    A response that shows one object (``retrieve``, ``update``, ``partial_update``) carries
    its strong ``ETag``, made of the model's version field (``conditional_version_field``, a
    positive integer). ``PUT``, ``PATCH`` and ``DELETE`` honour ``If-Match``: the version is
    compared and incremented by one ``UPDATE`` inside a transaction that also holds the
    serializer's save (or the delete), so of two writes of the same version exactly one is
    done and the other answers ``412 precondition_failed`` with nothing written. With
    ``conditional_required = True`` a write without ``If-Match`` answers
    ``428 precondition_required``; without it, such a write (and ``If-Match: *``) is done
    whatever the version, and still increments it.

    List it after ``IdempotentMixin`` and before DRF's class:
    ``class DocumentViewSet(IdempotentMixin, ConditionalUpdateMixin, ModelViewSet)``.
    """

    conditional_version_field: str = "version"
    conditional_required: bool = False

    _conditional_object: Any = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        me = mro.index(ConditionalUpdateMixin)
        misplaced = (APIView in mro and mro.index(APIView) < me) or (
            IdempotentMixin in mro and mro.index(IdempotentMixin) > me
        )
        if misplaced:
            bases = ", ".join(
                base.__name__
                for base in cls.__bases__
                if base not in (IdempotentMixin, ConditionalUpdateMixin)
            )
            first = "IdempotentMixin, " if IdempotentMixin in mro else ""
            raise TypeError(
                f"{cls.__name__}: list ConditionalUpdateMixin after IdempotentMixin and before "
                f"DRF's view class, as in class {cls.__name__}({first}ConditionalUpdateMixin, "
                f"{bases})."
            )
        # At import, as @conditional's options: a missing or text version field was a 500
        # (or a text column "incremented") at the first request.
        owner = cls.__name__
        try:
            validate_bool(cls.conditional_required)
        except InvalidValue as exc:
            raise option_error(owner, "conditional_required", exc) from None
        field = cls.conditional_version_field
        if not isinstance(field, str) or not field:
            raise ImproperlyConfigured(
                f"{owner}: conditional_version_field must be a non-empty string, not "
                f"{describe(field)}."
            )
        queryset = getattr(cls, "queryset", None)
        if queryset is not None:
            check_version_field(queryset.model, field, owner, "conditional_version_field")

    def get_etag(self, obj: Any) -> str:
        """The strong entity tag of ``obj``'s current version. Override it to add the primary
        key (``format_etag(version, pk=obj.pk)``) or another prefix."""
        return format_etag(getattr(obj, self.conditional_version_field))

    def get_object(self) -> Any:
        obj = super().get_object()  # type: ignore[misc]
        self._conditional_object = obj  # the object whose ETag the response carries
        return obj

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        self._require_precondition(request)
        return super().update(request, *args, **kwargs)  # type: ignore[misc]

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        self._require_precondition(request)
        return super().destroy(request, *args, **kwargs)  # type: ignore[misc]

    def perform_update(self, serializer: Any) -> None:
        instance = serializer.instance
        with self._compare_and_set(instance):
            # A client never sets the version: compare_and_set() did.
            serializer.validated_data.pop(self.conditional_version_field, None)
            super().perform_update(serializer)  # type: ignore[misc]

    def perform_destroy(self, instance: Any) -> None:
        with self._compare_and_set(instance):
            super().perform_destroy(instance)  # type: ignore[misc]

    def _require_precondition(self, request: Request) -> None:
        if self.conditional_required and "If-Match" not in request.headers:
            raise IdempotencyPreconditionRequired()

    @contextmanager
    def _compare_and_set(self, instance: Any) -> Iterator[None]:
        """Check ``If-Match`` against ``instance``'s version, then increment it in a
        transaction that also holds the write done inside this block."""
        field = self.conditional_version_field
        request: Request = self.request  # type: ignore[attr-defined]
        if_match = parse_if_match(request.headers.get("If-Match"))
        expected = None
        if if_match is not None and not if_match.any:
            if not if_match.matches(self.get_etag(instance)):
                raise IdempotencyPreconditionFailed()
            # The version this request read and validated against: a row updated since
            # then (even to a version the header also lists) must not be overwritten.
            expected = getattr(instance, field)
        model = type(instance)
        with transaction.atomic(using=router.db_for_write(model)):
            # The UPDATE takes the row lock first, so the write below cannot interleave with
            # another writer's; a 412 raised here rolls the whole block back.
            version = compare_and_set(model._base_manager.all(), instance.pk, expected, field)
            setattr(instance, field, version)
            yield

    def handle_exception(self, exc: Exception) -> HttpResponseBase:
        # With IdempotentMixin (listed first) these never reach here: it answers them itself.
        if isinstance(exc, PreconditionError):
            return precondition_response(exc)
        return super().handle_exception(exc)  # type: ignore[misc,no-any-return]

    def finalize_response(
        self, request: Request, response: HttpResponseBase, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        obj = self._conditional_object
        if obj is not None and 200 <= response.status_code < 300 and "ETag" not in response:
            response["ETag"] = self.get_etag(obj)
        return response
