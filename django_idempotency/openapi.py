"""OpenAPI through drf-spectacular: protected operations document the key and its answers.

Imported by the app's ``ready()`` when ``drf_spectacular`` is in ``INSTALLED_APPS``, which
registers :class:`IdempotencyViewExtension`; nothing else imports it.
"""

from __future__ import annotations

import functools
import inspect
from datetime import timedelta
from typing import Any

from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ComponentRegistry, ResolvedComponent, get_doc
from drf_spectacular.settings import spectacular_settings

from django_idempotency import exceptions
from django_idempotency.adapters import Options
from django_idempotency.conf import conf
from django_idempotency.http import MAX_KEY_LENGTH, REPLAYED_HEADER, is_stored_status
from django_idempotency.middleware import class_options
from django_idempotency.rest_framework import ConditionalUpdateMixin, IdempotentMixin

__all__ = ["IdempotencyViewExtension", "document_operation"]

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_COMPONENT = "IdempotencyProblem"
CODE_COMPONENT = "IdempotencyProblemCode"
PRECONDITION_COMPONENT = "PreconditionProblem"
PRECONDITION_CODE_COMPONENT = "PreconditionProblemCode"
#: The actions of ``ConditionalUpdateMixin`` whose requests honour ``If-Match``.
_CONDITIONAL_ACTIONS = {"PUT": "update", "PATCH": "partial_update", "DELETE": "destroy"}
_STORED_SCHEMA = "_idempotency_schema"


def _errors_by_status() -> dict[int, list[type[exceptions.IdempotencyError]]]:
    found: dict[int, list[type[exceptions.IdempotencyError]]] = {}
    for _, cls in inspect.getmembers(exceptions, inspect.isclass):
        if issubclass(cls, exceptions.IdempotencyError) and cls is not exceptions.IdempotencyError:
            classes = found.setdefault(cls.status_code, [])
            if cls not in classes:  # a class is listed once, whatever its aliases
                classes.append(cls)
    return {status: sorted(found[status], key=lambda cls: cls.default_code) for status in found}


_SUMMARIES = {
    400: "The Idempotency-Key header is missing or malformed, or the body cannot be read.",
    409: "A request with this key is still running (retry after Retry-After), or its "
    "response was not stored.",
    422: "This key was already used for a different request.",
    503: "The idempotency store is unreachable: nothing ran (retry after Retry-After).",
}


def _code_schema() -> dict[str, Any]:
    codes = sorted(cls.default_code for classes in _errors_by_status().values() for cls in classes)
    # A component of its own: drf-spectacular's enum hook would otherwise pull the enum out of
    # the property into a "CodeEnum", mixing it with a project's own "code" fields.
    return {"type": "string", "enum": codes, "description": "A stable code: branch on it."}


def _problem_schema(code_ref: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": "An RFC 9457 problem details object answered by django-idempotency.",
        "properties": {
            "type": {"type": "string", "description": "A URI naming the problem."},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string", "description": "What to do next."},
            "code": code_ref,
            "original_status": {
                "type": "integer",
                "description": "Only for idempotency_response_not_stored: the status of the "
                "response that was sent and not stored.",
            },
        },
        "required": ["type", "title", "status", "detail", "code"],
    }


def _duration_text(duration: timedelta) -> str:
    """``duration`` in words, as a client reads it: "1 day", "1 hour, 30 minutes"."""
    seconds = int(duration.total_seconds())
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}{'' if count == 1 else 's'}")
    return ", ".join(parts) or f"{duration.total_seconds():g} seconds"


def _key_parameter(required: bool, ttl: timedelta) -> dict[str, Any]:
    return {
        "name": conf.IDEMPOTENCY_HEADER,
        "in": "header",
        "required": required,
        "description": (
            "A unique value, such as a UUID, chosen by the client for this operation and "
            "sent again unchanged with every retry of it: the operation runs once, and each "
            "retry gets the first response again, marked Idempotent-Replayed: true. 1 to "
            f"{MAX_KEY_LENGTH} printable ASCII characters, sent bare (abc) or as a "
            'Structured Field string ("abc"). Reusing a key for a different request is '
            f"answered 422. A key is kept for {_duration_text(ttl)} after its request "
            "finished: a retry sent later runs the operation again."
        ),
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_KEY_LENGTH,
            "pattern": "^[\\x20-\\x7E]+$",
        },
        "example": "5f0c6a8e-3b1d-4c2e-9a7f-2d4b8c1e6f30",
    }


def _replayed_header() -> dict[str, Any]:
    return {
        "description": "true when this response is the stored answer to an earlier request "
        "with the same Idempotency-Key; absent otherwise.",
        "schema": {"type": "string", "enum": ["true"]},
    }


def _replayable(status: str, statuses: frozenset[str | int] | None) -> bool:
    """Whether a response the view documents under ``status`` may be a stored one, replayed.

    Asks the storing rule (:func:`~django_idempotency.http.is_stored_status`, with the view's
    ``stored_statuses``): a code when its status is stored, a range such as ``2XX`` when any
    status in it is, and ``default`` (the statuses left undocumented) always, as it may stand
    for any. This layer's own answers, documented after this, are never stored.
    """
    status = status.upper()
    if status == "DEFAULT":
        return True
    if len(status) != 3 or status[0] not in "12345":
        return False
    if status[1:] == "XX":
        first = int(status[0]) * 100
        return any(is_stored_status(code, statuses) for code in range(first, first + 100))
    return status[1:].isdigit() and is_stored_status(int(status), statuses)


def document_operation(
    operation: dict[str, Any], registry: ComponentRegistry, options: Options
) -> None:
    """Add the key header, the replay header and the problem responses to ``operation``."""
    required = conf.IDEMPOTENCY_REQUIRED if options.required is None else options.required
    parameters = operation.setdefault("parameters", [])
    name = conf.IDEMPOTENCY_HEADER.lower()
    parameters[:] = [
        parameter
        for parameter in parameters
        if not (parameter.get("in") == "header" and parameter.get("name", "").lower() == name)
    ]
    ttl = conf.IDEMPOTENCY_TTL if options.ttl is None else options.ttl
    parameters.append(_key_parameter(required, ttl))

    responses = operation.setdefault("responses", {})
    for status, response in responses.items():
        if _replayable(str(status), options.statuses):
            response.setdefault("headers", {})[REPLAYED_HEADER] = _replayed_header()

    code = ResolvedComponent(  # type: ignore[no-untyped-call]
        name=CODE_COMPONENT,
        type=ResolvedComponent.SCHEMA,
        schema=_code_schema(),
        object=CODE_COMPONENT,
    )
    registry.register_on_missing(code)
    component = ResolvedComponent(  # type: ignore[no-untyped-call]
        name=PROBLEM_COMPONENT,
        type=ResolvedComponent.SCHEMA,
        schema=_problem_schema(code.ref),
        object=PROBLEM_COMPONENT,
    )
    registry.register_on_missing(component)
    for status, classes in sorted(_errors_by_status().items()):
        codes = [
            cls.default_code
            for cls in classes
            if required or cls is not exceptions.IdempotencyKeyMissing
        ]
        description = f"{_SUMMARIES.get(status, '')} Codes: {', '.join(codes)}.".strip()
        response = responses.setdefault(str(status), {"description": description})
        response.setdefault("content", {}).setdefault(PROBLEM_MEDIA_TYPE, {"schema": component.ref})
        if status in (409, 503):
            response.setdefault("headers", {})["Retry-After"] = {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer"},
            }


def document_conditional(
    operation: dict[str, Any],
    registry: ComponentRegistry,
    view: ConditionalUpdateMixin,
    method: str,
    *,
    detail: bool,
) -> None:
    """Add ``ETag``, ``If-Match``, ``412`` and ``428`` to an operation of ``view``.

    A read of one object (``GET`` on a detail route) and an update answer the ``ETag``; an
    update or delete (``PUT``, ``PATCH``, ``DELETE``) takes ``If-Match`` and may answer
    ``412``, and ``428`` when the view requires the header.
    """
    action = getattr(view, "action", None)
    conditional = method in _CONDITIONAL_ACTIONS and (
        action is None or action == _CONDITIONAL_ACTIONS[method]
    )
    shows_one = (conditional and method != "DELETE") or (method == "GET" and detail)
    responses = operation.setdefault("responses", {})
    if shows_one:
        for status, response in responses.items():
            if str(status).upper() in ("2XX", "DEFAULT") or str(status).startswith("2"):
                response.setdefault("headers", {})["ETag"] = {
                    "description": "The strong entity tag of the version shown: send it in "
                    "If-Match to update or delete this version only.",
                    "schema": {"type": "string"},
                    "example": '"3"',
                }
    if not conditional:
        return
    required = view.conditional_required
    parameters = operation.setdefault("parameters", [])
    parameters[:] = [
        parameter
        for parameter in parameters
        if not (parameter.get("in") == "header" and parameter.get("name", "").lower() == "if-match")
    ]
    parameters.append(
        {
            "name": "If-Match",
            "in": "header",
            "required": required,
            "description": "The ETag of the version this request was made from: the request "
            "is applied only if it is still the current version, and answered 412 otherwise. "
            + (
                "Required: a request without it is answered 428."
                if required
                else "Without it (or with *), the current version is changed, whatever it is."
            ),
            "schema": {"type": "string"},
            "example": '"3"',
        }
    )
    code = ResolvedComponent(  # type: ignore[no-untyped-call]
        name=PRECONDITION_CODE_COMPONENT,
        type=ResolvedComponent.SCHEMA,
        schema={"type": "string", "enum": sorted(_PRECONDITION_CODES)},
        object=PRECONDITION_CODE_COMPONENT,
    )
    registry.register_on_missing(code)  # a component of its own, as in _code_schema()
    component = ResolvedComponent(  # type: ignore[no-untyped-call]
        name=PRECONDITION_COMPONENT,
        type=ResolvedComponent.SCHEMA,
        schema=_precondition_schema(code.ref),
        object=PRECONDITION_COMPONENT,
    )
    registry.register_on_missing(component)
    answers = [(412, "The If-Match header names no current version: nothing was written.")]
    if required:
        answers.append((428, "The If-Match header is missing: nothing was written."))
    for status, description in answers:
        response = responses.setdefault(str(status), {"description": description})
        response.setdefault("content", {}).setdefault(PROBLEM_MEDIA_TYPE, {"schema": component.ref})


def _precondition_schema(code_ref: dict[str, Any]) -> dict[str, Any]:
    schema = _problem_schema(code_ref)
    schema["description"] = "An RFC 9457 problem details object for a conditional request."
    del schema["properties"]["original_status"]
    return schema


_PRECONDITION_CODES = {
    exceptions.IdempotencyPreconditionFailed.default_code,
    exceptions.IdempotencyPreconditionRequired.default_code,
}


class IdempotentSchema:
    """Mixed into a protected view's own ``AutoSchema`` class by the extension below."""

    def get_operation(self, *args: Any, **kwargs: Any) -> Any:
        operation = super().get_operation(*args, **kwargs)  # type: ignore[misc]
        view: Any = self.view  # type: ignore[attr-defined]
        method: str = self.method  # type: ignore[attr-defined]
        if operation is None:
            return None
        registry = self.registry  # type: ignore[attr-defined]
        options = _operation_options(view, method)
        if options is not None and method in options.covered_methods:
            document_operation(operation, registry, options)
        if isinstance(view, ConditionalUpdateMixin):
            detail = not self._is_list_view()  # type: ignore[attr-defined]
            document_conditional(operation, registry, view, method, detail=detail)
        return operation

    def get_description(self) -> str:
        description: str = super().get_description()  # type: ignore[misc]
        view_class = type(self.view)  # type: ignore[attr-defined]
        if description and description == get_doc(view_class):
            # The view's docstring, which drf-spectacular looks for along the MRO: for a view
            # without one of its own, that would be one of the mixins', about the mixin.
            return _view_doc(view_class)
        return description


def _operation_options(view: Any, method: str) -> Options | None:
    """The options protecting ``view``'s ``method`` operation, or ``None`` if none do."""
    if isinstance(view, IdempotentMixin):
        # The view's own hook, which its requests run with, so that an override (or an
        # as_view() argument) is documented as it behaves; drf-spectacular's view has its
        # request (of this operation's method) and, on a viewset, its action set.
        return view.get_idempotency_options()
    return class_options(type(view), getattr(view, "action", None) or method.lower())


def _view_doc(view_class: type[Any]) -> str:
    """drf-spectacular's ``get_doc(view_class)`` with the mixins' docstrings skipped:
    the first docstring along the MRO before the library classes it excludes."""
    mro = view_class.__mro__
    excluded = spectacular_settings.GET_LIB_DOC_EXCLUDES()
    barrier = min((mro.index(klass) for klass in excluded if klass in mro), default=len(mro))
    for klass in mro[:barrier]:
        if klass not in (IdempotentMixin, ConditionalUpdateMixin) and klass.__doc__:
            return get_doc(klass)
    return ""


@functools.cache
def _schema_class(schema_class: type[Any]) -> type[Any]:
    return type(schema_class.__name__, (IdempotentSchema, schema_class), {})


def _wrap(schema: Any, view: Any) -> Any:
    """``schema`` (maybe a weak proxy, as drf-spectacular sets it) as an ``IdempotentSchema``."""
    schema_class: Any = schema.__class__
    if not (isinstance(schema_class, type) and issubclass(schema_class, AutoSchema)):
        return schema  # not drf-spectacular's: leave it alone
    wrapped = object.__new__(_schema_class(schema.__class__))
    wrapped.__dict__.update(schema.__dict__)
    wrapped.view = view
    return wrapped


class _SchemaDescriptor:
    """The replacement view's ``schema``: the original one, wrapped.

    A data descriptor, like DRF's own, so that drf-spectacular's ``view.schema = ...`` (for
    ``@extend_schema`` on an action) is wrapped too.
    """

    def __init__(self, original: type[Any]) -> None:
        self.original = original

    def __get__(self, instance: Any, owner: type[Any]) -> Any:
        if instance is None:
            return self.original.schema
        stored = instance.__dict__.get(_STORED_SCHEMA)
        if stored is None:
            stored = _wrap(self._original_schema(instance), instance)
            instance.__dict__[_STORED_SCHEMA] = stored
        return stored

    def _original_schema(self, instance: Any) -> Any:
        for klass in self.original.__mro__:
            if "schema" in vars(klass):
                schema = vars(klass)["schema"]
                getter = getattr(type(schema), "__get__", None)
                return schema if getter is None else getter(schema, instance, type(instance))
        return None  # pragma: no cover - APIView always has one

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[_STORED_SCHEMA] = _wrap(value, instance)


@functools.cache
def _replacement(view_class: type[Any]) -> type[Any]:
    return type(
        view_class.__name__,
        (view_class,),
        {
            "schema": _SchemaDescriptor(view_class),
            "__module__": view_class.__module__,
            "__qualname__": view_class.__qualname__,
            "__doc__": view_class.__doc__,
        },
    )


def _protects_any(view_class: type[Any]) -> bool:
    if issubclass(view_class, (IdempotentMixin, ConditionalUpdateMixin)):
        return True  # its get_idempotency_options() says which methods, per instance
    names = getattr(view_class, "http_method_names", ())
    return any(class_options(view_class, name) is not None for name in names)


class IdempotencyViewExtension(OpenApiViewExtension):  # type: ignore[no-untyped-call]
    """Documents every DRF view protected by ``IdempotentMixin`` or ``@idempotent``, and the
    conditional requests of ``ConditionalUpdateMixin``.

    Its priority is below the default, so a project's own view extension for a view wins
    (and that view is then documented as the project's extension says).
    """

    target_class = "rest_framework.views.APIView"
    match_subclasses = True
    priority = -1

    @classmethod
    def _matches(cls, target: Any) -> bool:
        return bool(super()._matches(target)) and _protects_any(target)

    def view_replacement(self) -> Any:
        return _replacement(self.target)
