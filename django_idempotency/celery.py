"""Idempotent Celery tasks: a message delivered many times has its effect once.

Brokers deliver at least once: a worker that dies before acknowledging a message (``acks_late``),
a visibility timeout that passes, a producer that re-publishes after a lost confirmation, all
hand the same message to a worker again. :func:`idempotent_task` runs the task once per key,
through :class:`~django_idempotency.functions.IdempotentCall` (the same core, store, modes
and TTL as views and functions), and gives every later delivery the stored result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any, TypeVar, overload

from asgiref.sync import iscoroutinefunction
from celery import Task, current_app, shared_task
from celery._state import get_current_task
from celery.exceptions import Retry
from django.db import DatabaseError

from django_idempotency.adapters import option_error
from django_idempotency.conf import InvalidValue, describe
from django_idempotency.exceptions import IdempotencyKeyInProgress
from django_idempotency.functions import CallOptions, IdempotentCall, Serializer, describe_arguments
from django_idempotency.models import DeadLetter, OutboxEvent
from django_idempotency.outbox import relay

__all__ = ["idempotent_task", "publish_task", "relay_outbox"]

Func = TypeVar("Func", bound=Callable[..., Any])

logger = logging.getLogger("django_idempotency")


@overload
def idempotent_task(func: Func, /) -> Func: ...


@overload
def idempotent_task(
    *,
    key: Callable[..., Any] | None = None,
    scope: str | None = None,
    fingerprint: Callable[..., Any] | None = None,
    ttl: timedelta | None = None,
    atomic: bool | None = None,
    wait: timedelta | None = None,
    serializer: Serializer | str | None = None,
    retry_in_progress: bool = True,
) -> Callable[[Func], Func]: ...


def idempotent_task(
    func: Callable[..., Any] | None = None,
    /,
    *,
    key: Callable[..., Any] | None = None,
    scope: str | None = None,
    fingerprint: Callable[..., Any] | None = None,
    ttl: timedelta | None = None,
    atomic: bool | None = None,
    wait: timedelta | None = None,
    serializer: Serializer | str | None = None,
    retry_in_progress: bool = True,
) -> Any:
    """Run a Celery task once per key; every later delivery returns the stored result.

    Place it below the task decorator, with or without ``bind=True``::

        @app.task(bind=True, acks_late=True)
        @idempotent_task
        def charge(self, order_id, amount): ...

        @shared_task
        @idempotent_task(key=lambda event: event["id"])
        def handle_webhook(event): ...

    * ``key``: a function of the task's arguments (without ``self``) returning the message's
      own id, for redeliveries that arrive with a new task id (a webhook's event id, an outbox
      row's id). By default the key is the task id, which every redelivery of one message
      keeps (``acks_late`` after a crash, a visibility timeout, a producer publishing again
      with the same ``task_id``);
    * ``scope``: by default ``celery:<task name>``, so two tasks never share keys;
    * ``fingerprint``: a function of the arguments whose JSON-serialisable result describes
      the message; by default the arguments themselves. The key arriving with a different
      fingerprint fails the task with :class:`IdempotencyKeyMismatch`;
    * ``ttl``, ``atomic``, ``wait`` and ``serializer`` as for
      :func:`~django_idempotency.functions.idempotent_call`. By default, on the database
      store, the task runs inside the transaction that stores its result;
    * ``retry_in_progress``: a delivery whose key another worker is still running is
      published again for after ``Retry-After`` (1 s), and raises Celery's ``Retry``, as
      ``task.retry()`` does, but without counting against the task's ``max_retries``: it
      comes back until the key is free, then returns the stored result. With ``False``,
      or in eager mode (``apply()``, ``task_always_eager``), or called directly, it raises
      :class:`IdempotencyKeyInProgress` instead.

    A task that raises stores nothing and frees its key (in the atomic mode its database
    writes roll back), so Celery's own retry, or the next delivery, runs it again, unless it
    committed phases: the task body finds its call as ``task.request.idempotency`` (``self``
    for a bound task, else ``celery.current_task``), and a delivery after a failure resumes
    after the last phase committed (with ``atomic=False``; see docs/phases.md).

    A failure of the task body when Celery would retry no more (``request.retries`` has
    reached the task's ``max_retries``; never with ``max_retries=None``) is recorded as a
    :class:`~django_idempotency.models.DeadLetter`, one per key, for an operator to inspect
    and re-drive (docs/celery.md#dead-letters).
    """

    if func is not None and not callable(func):
        raise TypeError(f"@idempotent_task takes a function, or options by keyword, not {func!r}.")

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        name = f"{func.__module__}.{func.__qualname__}"
        if iscoroutinefunction(func):
            raise TypeError(f"@idempotent_task cannot wrap the async function {name}.")
        options = CallOptions(
            f"@idempotent_task on {name}",
            key=key,
            scope=scope,
            fingerprint=fingerprint,
            ttl=ttl,
            atomic=atomic,
            wait=wait,
            serializer=serializer,
            flags={"retry_in_progress": retry_in_progress},
        )
        if scope is not None and not isinstance(scope, str):
            # CallOptions accepts a function of the arguments, as @idempotent_function does;
            # a task's scope names the task's keys once, for every message.
            raise option_error(
                f"@idempotent_task on {name}",
                "scope",
                InvalidValue(f"must be a string, not {describe(scope)}."),
            )

        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # bind=True passes the task itself first (a message's arguments are never tasks):
            # it is not one of the message's arguments.
            bound = bool(args) and isinstance(args[0], Task)
            task = args[0] if bound else get_current_task()
            arguments = args[1:] if bound else args
            if key is not None:
                call_key = key(*arguments, **kwargs)
            else:
                call_key = None if task is None else task.request.id
            task_name = name if task is None else task.name
            call = options.call(
                call_key,
                args=arguments,
                kwargs=kwargs,
                name=task_name,
                default_scope=f"celery:{task_name}",
                missing=f"{name} is an idempotent task and needs a key: run it through Celery "
                "(its task id is the key), or give @idempotent_task key=.",
            )

            failures: list[BaseException] = []

            def work() -> Any:
                if task is not None:
                    # For phases and foreign keys in the task body, as request.idempotency in
                    # a view: self.request.idempotency.phase(...).
                    task.request.idempotency = call
                try:
                    return func(*args, **kwargs)
                except Exception as exc:
                    failures.append(exc)
                    raise

            try:
                return call.run(work)
            except IdempotencyKeyInProgress as exc:
                # Only when the key was held on the way in (the call never claimed it): a
                # direct call has no message to publish again, and eager mode (apply(),
                # task_always_eager) would run the retry at once, ignoring its countdown.
                if (
                    call.claimed
                    or not retry_in_progress
                    or task is None
                    or task.request.called_directly
                    or task.request.is_eager
                ):
                    raise
                raise _defer(task, exc) from None
            except Exception as exc:
                # After call.run(): the key is freed (or keeps its recovery points) and, in
                # the atomic mode, the failed attempt's writes rolled back.
                # Only the body's own errors; a Retry it raised (task.retry()) is no failure.
                body_failed = bool(failures) and failures[-1] is exc and not isinstance(exc, Retry)
                if body_failed and _retries_exhausted(task):
                    _record_dead_letter(task, call, arguments, kwargs, exc)
                raise

        wrapper.idempotent_task = name  # type: ignore[attr-defined]
        return wrapper

    if func is not None:
        return decorator(func)
    return decorator


def _retries_exhausted(task: Any) -> bool:
    """Whether Celery would refuse another retry of this delivery, as ``task.retry()`` does.

    ``retry()`` raises instead of retrying once ``request.retries + 1 > max_retries``; a task
    with ``max_retries=None`` retries for ever, so never exhausts them.
    """
    if task is None or task.request.called_directly or task.max_retries is None:
        return False
    retries: int = task.request.retries or 0
    max_retries: int = task.max_retries
    return retries >= max_retries


def _record_dead_letter(
    task: Any, call: IdempotentCall, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception
) -> None:
    try:
        DeadLetter.objects.record(
            scope=call.scope,
            key=call.key,
            task_name=task.name,
            task_id=task.request.id,
            arguments=describe_arguments(None, args, kwargs),
            error=exc,
        )
    except (DatabaseError, TypeError, ValueError):
        # The task's own error is what Celery must see; losing the letter is logged.
        logger.exception("Could not record the dead letter of %s[%s].", task.name, call.key)


def _defer(task: Any, exc: IdempotencyKeyInProgress) -> Retry:
    """Publish the message again for after ``Retry-After``; the ``Retry`` to raise.

    Another worker runs this key: when it has finished, the message returns its stored
    result (or runs, if that worker failed and freed the key). Unlike ``task.retry()`` this
    keeps ``request.retries``, so the wait does not use up the task's ``max_retries``: a
    redelivery after a crash in the lease mode must outlast the dead worker's lease.
    """
    countdown = exc.retry_after or 1
    signature = task.signature_from_request(countdown=countdown)
    signature.apply_async()
    return Retry(exc=exc, when=countdown, sig=signature)


# -- The transactional outbox (docs/outbox.md) -------------------------------------------------


def publish_task(event: OutboxEvent) -> None:
    """An outbox publisher: send the Celery task named by the event's topic.

    The payload is the task's one argument and the event's message id its task id, so every
    publication of one event carries the same task id, and an :func:`idempotent_task` keyed
    by the task id (its default) has its effect once. The event's headers become the
    message's headers. The task is sent through the current Celery app: by name when this
    process does not know the task, else through it (with its routing and options).
    """
    task = current_app.tasks.get(event.topic)
    options: dict[str, Any] = {"task_id": str(event.message_id)}
    if event.headers:
        options["headers"] = dict(event.headers)
    if task is None:
        current_app.send_task(event.topic, (event.payload,), **options)
    else:
        task.apply_async((event.payload,), **options)


@shared_task(name="django_idempotency.celery.relay_outbox", ignore_result=True)  # type: ignore[untyped-decorator]
def relay_outbox(batch_size: int | None = None, max_batches: int = 100) -> dict[str, int]:
    """Publish the due outbox events: for a Celery beat schedule, every few seconds.

    Runs batches of ``batch_size`` (default ``IDEMPOTENCY_OUTBOX_BATCH_SIZE``) until one
    comes back short, at most ``max_batches``. Two runs at once take different events.
    """
    result = relay(batch_size=batch_size, max_batches=max_batches)
    return {"published": result.published, "failed": result.failed}
