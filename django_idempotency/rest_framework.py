"""``IdempotentMixin`` for DRF ``APIView``s and viewsets: a thin shell over ``adapters``.

The only module that imports Django REST Framework.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.http import HttpResponse
from django.http.response import HttpResponseBase
from rest_framework.request import Request
from rest_framework.views import APIView

from django_idempotency.adapters import Execution, Options
from django_idempotency.exceptions import IdempotencyError
from django_idempotency.http import error_response

__all__ = ["IdempotentMixin"]

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
