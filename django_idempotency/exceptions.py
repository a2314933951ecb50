"""The errors a client can cause, each carrying what a problem+json renderer needs."""

from __future__ import annotations

import math
from typing import Any

from django.utils.translation import gettext_lazy as _

from django_idempotency.conf import conf

#: Where each problem's code is explained (RFC 9457 ``type``; the IETF draft's section 2.7
#: asks for a link to documentation): a heading per code on the docs' errors page.
DOCS_URL = "https://github.com/django-idempotency/django-idempotency/blob/main/docs/errors.md"


class IdempotencyError(Exception):
    """Base class: a request this layer answers itself, never running the view."""

    status_code = 400
    default_code = "idempotency_error"
    default_title: Any = _("Idempotency error")
    default_detail: Any = _("The request could not be processed idempotently.")

    def __init__(self, detail: Any = None, *, retry_after: float | None = None) -> None:
        if detail is None:
            # The header's name as the project configured it (IDEMPOTENCY_HEADER).
            detail = self.default_detail % {"header": conf.IDEMPOTENCY_HEADER}
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(str(self.detail))

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 problem details object for this error."""
        return {
            "type": f"{DOCS_URL}#{self.default_code}",
            "title": str(self.default_title),
            "status": self.status_code,
            "detail": str(self.detail),
            "code": self.default_code,
        }


class IdempotencyKeyMissing(IdempotencyError):
    status_code = 400
    default_code = "idempotency_key_missing"
    default_title = _("Idempotency key missing")
    default_detail = _(
        "This endpoint requires an %(header)s header. Send a unique value, "
        "such as a UUID, and reuse it when you retry the same request."
    )


class IdempotencyKeyInvalid(IdempotencyError):
    status_code = 400
    default_code = "idempotency_key_invalid"
    default_title = _("Idempotency key invalid")
    default_detail = _(
        "The %(header)s header must be a single value of 1 to 255 printable ASCII "
        'characters, sent bare (abc) or as a quoted string ("abc").'
    )


class IdempotencyRequestInvalid(IdempotencyError):
    status_code = 400
    default_code = "idempotency_request_invalid"
    default_title = _("Request unreadable")
    default_detail = _(
        "The request body could not be read (it is too large, has too many fields or is a "
        "malformed multipart body), so it cannot be checked against its idempotency key."
    )

    #: The detail for a body that ended before its ``Content-Length``.
    truncated_detail = _(
        "The request body is shorter than its Content-Length header says: it was cut off on "
        "the way, so it was not processed. Send the whole body again with the same key."
    )
    #: The detail for a Content-Type charset that is not a text encoding (``base64``).
    charset_detail = _(
        "The charset of the Content-Type header is not a text encoding, so the request "
        "cannot be decoded. Use UTF-8."
    )
    #: The detail for a path that no store can keep, such as one holding NUL (%00).
    unstorable_path_detail = _(
        "The request path holds characters that cannot be stored with its idempotency key "
        "(such as NUL, %00), so it was not processed."
    )


class IdempotencyKeyInProgress(IdempotencyError):
    status_code = 409
    default_code = "idempotency_key_in_progress"
    default_title = _("Request in progress")
    default_detail = _(
        "A request with this idempotency key is still being processed. Retry after the "
        "time given in the Retry-After header to receive its response."
    )


class IdempotencyResponseNotStored(IdempotencyError):
    status_code = 409
    default_code = "idempotency_response_not_stored"
    default_title = _("Response not stored")
    default_detail = _(
        "A request with this idempotency key was already processed, but its response was "
        "streamed or too large to store, so it cannot be replayed. The operation will not "
        "run again with this key; use a new key only if you mean to repeat it."
    )

    def __init__(self, detail: Any = None, *, original_status: int | None = None) -> None:
        super().__init__(detail)
        self.original_status = original_status

    def problem(self) -> dict[str, Any]:
        problem = super().problem()
        problem["original_status"] = self.original_status
        return problem


class IdempotencyKeyMismatch(IdempotencyError):
    status_code = 422
    default_code = "idempotency_key_mismatch"
    default_title = _("Idempotency key reused")
    default_detail = _(
        "This idempotency key was already used for a different request (its method, path, "
        "query string or body differ). Use a new key for a new request."
    )


class IdempotencyStoreUnavailable(IdempotencyError):
    status_code = 503
    default_code = "idempotency_store_unavailable"
    default_title = _("Idempotency store unavailable")
    default_detail = _(
        "The idempotency store cannot be reached, so the request was not processed. "
        "Retry after the time given in the Retry-After header."
    )


#: Where the conditional-update problems are explained: a heading per code on their own page.
CONDITIONAL_DOCS_URL = (
    "https://github.com/django-idempotency/django-idempotency/blob/main/docs/conditional.md"
)


class PreconditionError(Exception):
    """Base class of the answers of a conditional update (RFC 9110 ``If-Match``).

    Not an :class:`IdempotencyError`: they are about a resource's version, not about an
    ``Idempotency-Key``, so the key's contract, error page and OpenAPI responses leave them
    out. They carry the same problem+json shape, linked to docs/conditional.md.
    """

    status_code = 412
    default_code = "precondition_failed"
    default_title: Any = _("Precondition failed")
    default_detail: Any = _("The request's precondition was not met.")

    def __init__(self, detail: Any = None) -> None:
        self.detail = self.default_detail if detail is None else detail
        super().__init__(str(self.detail))

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 problem details object for this error."""
        return {
            "type": f"{CONDITIONAL_DOCS_URL}#{self.default_code}",
            "title": str(self.default_title),
            "status": self.status_code,
            "detail": str(self.detail),
            "code": self.default_code,
        }


class IdempotencyPreconditionFailed(PreconditionError):
    """A conditional update's ``If-Match`` names no current version of the resource."""

    status_code = 412
    default_code = "precondition_failed"
    default_title = _("Precondition failed")
    default_detail = _(
        "The resource changed since you read it: the If-Match header does not name its "
        "current version, so nothing was written. Read the resource again (its ETag header "
        "gives the current version), reapply your change and send it with the new ETag."
    )


class IdempotencyPreconditionRequired(PreconditionError):
    """A conditional update that must carry ``If-Match`` came without it."""

    status_code = 428
    default_code = "precondition_required"
    default_title = _("Precondition required")
    default_detail = _(
        "This resource is only updated conditionally: read it first, then send its ETag "
        "header's value in an If-Match header with the update."
    )


class IdempotencyLeaseLost(Exception):
    """The run's lease passed and another attempt took its key over: stop the work.

    Raised by a phase whose recovery point could not be saved. Not a client's error: it
    means a heartbeat could not renew the lease (the store was unreachable for longer than
    ``IDEMPOTENCY_LOCK_TTL``), and the attempt that took over carries on from the last
    recovery point.
    """

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency key {key!r} was taken over by another attempt.")
        self.key = key


# The names these two had before every error of this layer carried the ``Idempotency``
# prefix. Kept, as the same classes, for code that imports or catches them.
RequestInvalid = IdempotencyRequestInvalid
StoreUnavailable = IdempotencyStoreUnavailable
