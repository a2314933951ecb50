"""Function views with conditional updates (``@conditional``), and their URLs.

Used by tests/test_conditional.py through ``pytest.mark.urls``; no DRF, so they also run in
the minimal tox env.
"""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import path

from django_idempotency.conditional import conditional
from django_idempotency.decorators import idempotent
from tests.models import Document


def _document(request: Any, pk: int) -> HttpResponse:
    """Show, rename or delete a document; a title over 100 characters is a 400."""
    document = get_object_or_404(Document, pk=pk)
    if request.method in ("GET", "HEAD"):
        return JsonResponse({"title": document.title, "version": document.version})
    if request.method == "DELETE":
        document.delete()
        return HttpResponse(status=204)
    title = json.loads(request.body).get("title", "")
    if len(title) > 100:
        return JsonResponse({"title": "at most 100 characters"}, status=400)
    Document.objects.filter(pk=pk).update(title=title)
    return JsonResponse({"title": title})


function_document = conditional(Document)(_document)
function_required = conditional(Document, required=True)(_document)
function_pk = conditional(Document.objects.all(), with_pk=True)(_document)
function_keyed = idempotent(methods=["PUT", "PATCH", "DELETE"])(
    conditional(Document, required=True)(_document)
)

urlpatterns = [
    path("function/<int:pk>/", function_document),
    path("function-required/<int:pk>/", function_required),
    path("function-pk/<int:pk>/", function_pk),
    path("function-keyed/<int:pk>/", function_keyed),
]
