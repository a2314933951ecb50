"""``IdempotencyMiddleware``: protect the views under chosen paths without touching them.

The paths are ``IDEMPOTENCY_MIDDLEWARE_PATHS``, the methods ``IDEMPOTENCY_METHODS``; every
other decision is ``adapters.Execution``'s, exactly as for ``@idempotent``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import FunctionType
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from django_idempotency.adapters import Execution, Options, run_async
from django_idempotency.checks import ensure_valid_settings
from django_idempotency.conf import get_middleware_patterns

__all__ = [
    "IdempotencyMiddleware",
    "class_options",
    "protects_itself",
    "uses_mixin",
    "view_options",
]

# Where the request's execution waits for process_view (and process_exception) to use it.
_EXECUTION = "_idempotency_middleware_execution"
# How deep to look through decorators' wrappers for an ``@idempotent`` one.
_MAX_DEPTH = 8


class IdempotencyMiddleware:
    """Protect every view whose path matches ``IDEMPOTENCY_MIDDLEWARE_PATHS``.

    Put it after ``AuthenticationMiddleware`` and ``CsrfViewMiddleware`` (last is safest): the
    key is scoped to ``request.user`` as that middleware set it. A covered request runs its
    view as under ``@idempotent``: the same errors, the same storing rule (a view that raises
    stores nothing), the atomic mode for a sync stack and the lease mode under ASGI. Views
    already protected by ``@idempotent`` or ``IdempotentMixin`` are left to them.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        # Django loads middleware when the server starts (get_wsgi_application()): a wrong
        # setting stops gunicorn or uvicorn there, with the system checks' messages.
        ensure_valid_settings()
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        # The execution is opened here and claims in process_view, so that the atomic mode's
        # transaction (opened by the claim) encloses the view and closes when it is done.
        with Execution() as execution:
            setattr(request, _EXECUTION, execution)
            response = self.get_response(request)
            return execution.finish(request, response)

    async def __acall__(self, request: HttpRequest) -> Any:
        # Django cannot hold a transaction open across an await: the lease mode.
        execution = Execution(is_async=True)
        setattr(request, _EXECUTION, execution)
        return await run_async(
            lambda: self.get_response(request),
            finish=lambda response: execution.finish(request, response),
            abort=execution.abort,
        )

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        execution: Execution | None = getattr(request, _EXECUTION, None)
        if execution is None or not _covered_path(request.path_info):
            return None
        if protects_itself(view_func, request.method or ""):
            return None  # the view protects itself: claiming here too would claim twice
        return execution.begin(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        execution: Execution | None = getattr(request, _EXECUTION, None)
        if execution is not None:
            # The view raised: Django turns that into a response, which must not be stored.
            execution.fail()


def _covered_path(path: str) -> bool:
    return any(pattern.search(path) for pattern in get_middleware_patterns())


def protects_itself(view: Callable[..., Any], method: str) -> bool:
    """Whether ``view`` protects its ``method`` requests itself (the middleware leaves those).

    True for a class-based view with ``IdempotentMixin``, whatever its options: its own
    ``get_idempotency_options()`` decides them per request, so no class attribute is read
    here. True for a view under ``@idempotent`` (also below other decorators and DRF's
    ``@api_view``), with any options.
    """
    return _protection(view, method.lower()) is not None


def view_options(view: Callable[..., Any], method: str) -> Options | None:
    """The options of the ``@idempotent`` that protects ``view``'s ``method``, or ``None``.

    Finds the decorator below other decorators and DRF's ``@api_view``. ``None`` for an
    unprotected view and for a view with ``IdempotentMixin``: only an instance of the view
    knows its options (``get_idempotency_options()``); see :func:`protects_itself`.
    """
    found = _protection(view, method.lower())
    return found if isinstance(found, Options) else None


def class_options(view_class: type[Any], handler: str) -> Options | None:
    """The options of the ``@idempotent`` on ``view_class``'s method ``handler``, or ``None``.

    DRF's ``@api_view`` makes the function it decorates each handler of its class.

    ``None`` for a class with ``IdempotentMixin`` too (see :func:`uses_mixin`): its options
    are its instances' ``get_idempotency_options()``, never a copy of its attributes.
    """
    if uses_mixin(view_class):
        return None
    found = _protection(getattr(view_class, handler, None), handler)
    return found if isinstance(found, Options) else None


def uses_mixin(view_class: type[Any]) -> bool:
    """Whether ``view_class`` is protected by ``IdempotentMixin``."""
    # Without the module imported, no view can use the mixin; and DRF is never imported here.
    module = sys.modules.get("django_idempotency.rest_framework")
    mixin = getattr(module, "IdempotentMixin", None)
    return mixin is not None and issubclass(view_class, mixin)


def _protection(function: Any, method: str) -> Options | type[Any] | None:
    """What protects ``function`` for ``method``: the options of its ``@idempotent``, its
    class with ``IdempotentMixin``, or ``None``."""
    function = getattr(function, "__func__", function)  # a bound method
    if not isinstance(function, FunctionType):
        return None
    return _function_protection(function, method)


@functools.lru_cache(maxsize=1024)
def _function_protection(function: FunctionType, method: str) -> Options | type[Any] | None:
    return _search(function, method, _MAX_DEPTH)


def _search(function: Any, method: str, depth: int) -> Options | type[Any] | None:
    function = getattr(function, "__func__", function)
    if not isinstance(function, FunctionType) or depth == 0:
        return None
    options = getattr(function, "idempotency_options", None)  # set by @idempotent
    if isinstance(options, Options):
        return options
    # A class-based view's as_view() function (Django sets view_class, DRF cls), maybe found
    # in the closure of a decorator written without functools.wraps.
    view_class = getattr(function, "view_class", None) or getattr(function, "cls", None)
    if isinstance(view_class, type):
        if uses_mixin(view_class):
            return view_class
        actions: dict[str, str] = getattr(function, "actions", None) or {}  # a viewset's
        return _search(getattr(view_class, actions.get(method, method), None), method, depth - 1)
    inner = [getattr(function, "__wrapped__", None)]
    # DRF's @api_view keeps the function in the closure of the handler it generates.
    inner += [cell.cell_contents for cell in function.__closure__ or () if _filled(cell)]
    for candidate in inner:
        found = _search(candidate, method, depth - 1)
        if found is not None:
            return found
    return None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True
