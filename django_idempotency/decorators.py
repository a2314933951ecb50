"""``@idempotent`` for function-based views, sync and async: a thin shell over ``adapters``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from functools import wraps
from typing import Any, TypeVar, overload

from asgiref.sync import iscoroutinefunction
from django.core.exceptions import ImproperlyConfigured

from django_idempotency.adapters import Execution, Options, refuse_async_atomic, run_async

ViewFunc = TypeVar("ViewFunc", bound=Callable[..., Any])


@overload
def idempotent(view_func: ViewFunc, /) -> ViewFunc: ...


@overload
def idempotent(
    *,
    required: bool | None = None,
    ttl: timedelta | None = None,
    methods: Iterable[str] | None = None,
    atomic: bool | None = None,
    wait: timedelta | None = None,
    stored_statuses: Iterable[str | int] | None = None,
) -> Callable[[ViewFunc], ViewFunc]: ...


def idempotent(
    view_func: Callable[..., Any] | None = None,
    /,
    *,
    required: bool | None = None,
    ttl: timedelta | None = None,
    methods: Iterable[str] | None = None,
    atomic: bool | None = None,
    wait: timedelta | None = None,
    stored_statuses: Iterable[str | int] | None = None,
) -> Any:
    """Run a view once per ``Idempotency-Key`` and replay its stored response to retries.

    Use bare (``@idempotent``) or with options; each option left out (``None``) follows its
    ``IDEMPOTENCY_*`` setting, read at request time:

    * ``required``: answer 400 when a covered request has no key;
    * ``ttl``: how long a finished key is replayed;
    * ``methods``: the covered methods (safe methods are never covered);
    * ``atomic``: run the view inside the transaction that locks the key and stores the
      response (the default for sync views), or, with ``False``, in the lease mode with two
      short transactions around it. Async views always use the lease mode;
    * ``wait``: how long a duplicate waits for the first request to finish before it is
      answered 409;
    * ``stored_statuses``: which returned statuses are stored, as status classes and codes
      (``("2xx", 404, 410)``); a response of any other status frees the key.

    Under DRF's ``@api_view``, put ``@idempotent`` below it, so that the key is scoped to the
    user DRF authenticated.
    """
    if view_func is not None and not callable(view_func):
        raise TypeError(
            f"@idempotent takes a view, or options by keyword, not {view_func!r}: write "
            "@idempotent or @idempotent(required=True)."
        )

    def decorator(view_func: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(view_func):
            raise TypeError(f"@idempotent(...) decorates a view, not {view_func!r}.")
        name = _view_name(view_func)
        if hasattr(view_func, "cls") and hasattr(view_func, "initkwargs"):
            # A view made by as_view(), such as DRF's @api_view: here the request is not yet
            # authenticated by DRF, so every token or basic-auth caller would share one scope.
            raise ImproperlyConfigured(
                f"@idempotent must go below @api_view, not above it, on {name}; for "
                "class-based DRF views use IdempotentMixin."
            )
        options = Options(
            required=required,
            ttl=ttl,
            methods=methods,
            atomic=atomic,
            wait=wait,
            stored_statuses=stored_statuses,
            owner=f"@idempotent on {name}",
        )
        if iscoroutinefunction(view_func):
            refuse_async_atomic(
                options.atomic, f"@idempotent(atomic=True) cannot wrap the async view {name}"
            )

            @wraps(view_func)
            async def _view_wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
                execution = Execution(options, is_async=True)
                return await run_async(
                    lambda: view_func(request, *args, **kwargs),
                    begin=lambda: execution.begin(request),
                    finish=lambda response: execution.finish(request, response),
                    abort=execution.abort,
                )

            _view_wrapper.idempotency_options = options  # type: ignore[attr-defined]
            return _view_wrapper

        @wraps(view_func)  # type: ignore[no-redef]
        def _view_wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
            with Execution(options) as execution:
                answer = execution.begin(request)
                if answer is not None:
                    return answer
                return execution.finish(request, view_func(request, *args, **kwargs))

        # How IdempotencyMiddleware (and a decorator wrapping this one with functools.wraps,
        # which copies it) tells that the view is protected already, and how.
        _view_wrapper.idempotency_options = options  # type: ignore[attr-defined]
        return _view_wrapper

    if view_func is not None:
        return decorator(view_func)
    return decorator


def _view_name(view_func: Callable[..., Any]) -> str:
    """The dotted name of the user's view. A view made by ``as_view()`` is named after its
    class, which DRF's ``@api_view`` names (``__name__`` only) after the user's function."""
    view_class = getattr(view_func, "cls", None) or getattr(view_func, "view_class", None)
    if isinstance(view_class, type):
        return f"{view_class.__module__}.{view_class.__name__}"
    module = getattr(view_func, "__module__", None) or "?"
    qualname = getattr(view_func, "__qualname__", None) or repr(view_func)
    return f"{module}.{qualname}"
