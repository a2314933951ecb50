"""``IdempotencyMiddleware``: protect the views under chosen paths without touching them.

The paths are ``IDEMPOTENCY_MIDDLEWARE_PATHS``, the methods ``IDEMPOTENCY_METHODS``; every
other decision is ``core.Execution``'s, exactly as for ``@idempotent``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import FunctionType
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from django_idempotency.conf import get_middleware_patterns
from django_idempotency.core import Execution, Options, error_response
from django_idempotency.exceptions import IdempotencyError

__all__ = ["IdempotencyMiddleware", "class_options", "view_options"]

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
        try:
            response = await self.get_response(request)
        except BaseException:
            await sync_to_async(execution.abort)()
            raise
        return await sync_to_async(execution.finish)(request, response)

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
        if view_options(view_func, request.method or "") is not None:
            return None  # the view protects itself: claiming here too would claim twice
        try:
            return execution.begin(request)
        except IdempotencyError as exc:
            return error_response(exc)

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        execution: Execution | None = getattr(request, _EXECUTION, None)
        if execution is not None:
            # The view raised: Django turns that into a response, which must not be stored.
            execution.fail()


def _covered_path(path: str) -> bool:
    return any(pattern.search(path) for pattern in get_middleware_patterns())


def view_options(view: Callable[..., Any], method: str) -> Options | None:
    """The options ``view`` already protects ``method`` with, or ``None`` if it does not.

    Finds ``@idempotent`` on the view or below other decorators and DRF's ``@api_view``, and
    ``IdempotentMixin`` on a class-based view (its ``as_view()`` function).
    """
    view_class = getattr(view, "view_class", None) or getattr(view, "cls", None)
    if isinstance(view_class, type):
        actions: dict[str, str] = getattr(view, "actions", None) or {}
        return class_options(view_class, actions.get(method.lower(), method.lower()))
    return _decorator_options(view)


def class_options(view_class: type[Any], handler: str) -> Options | None:
    """The options a class-based view protects its method ``handler`` with, or ``None``.

    ``IdempotentMixin`` protects every handler (each with the view's own methods);
    ``@idempotent`` under DRF's ``@api_view`` protects the function's handlers.
    """
    mixin = _mixin()
    if mixin is not None and issubclass(view_class, mixin):
        return Options(
            required=view_class.idempotency_required,
            ttl=view_class.idempotency_ttl,
            methods=view_class.idempotency_methods,
            atomic=view_class.idempotency_atomic,
            wait=view_class.idempotency_wait,
        )
    function = getattr(view_class, handler, None)
    return _decorator_options(function) if callable(function) else None


def _mixin() -> type[Any] | None:
    # Without the module imported, no view can use the mixin; and DRF is never imported here.
    module = sys.modules.get("django_idempotency.rest_framework")
    return getattr(module, "IdempotentMixin", None)


@functools.lru_cache(maxsize=1024)
def _decorator_options(function: Callable[..., Any]) -> Options | None:
    return _find_decorator_options(function, _MAX_DEPTH)


def _find_decorator_options(function: Any, depth: int) -> Options | None:
    function = getattr(function, "__func__", function)  # a bound method
    if not isinstance(function, FunctionType) or depth == 0:
        return None
    options = getattr(function, "idempotency_options", None)  # set by @idempotent
    if isinstance(options, Options):
        return options
    inner = [getattr(function, "__wrapped__", None)]
    # DRF's @api_view keeps the function in the closure of the handler it generates.
    inner += [cell.cell_contents for cell in function.__closure__ or () if _filled(cell)]
    for candidate in inner:
        options = _find_decorator_options(candidate, depth - 1)
        if options is not None:
            return options
    return None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True
