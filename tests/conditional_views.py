"""DRF viewsets with conditional updates (``ConditionalUpdateMixin``), function views with
``@conditional``, and their URLs.

Used by tests/test_conditional.py through ``pytest.mark.urls("tests.conditional_views")``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

from django.http import HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import path
from rest_framework import serializers, viewsets
from rest_framework.routers import SimpleRouter

from django_idempotency.conditional import conditional, format_etag
from django_idempotency.decorators import idempotent
from django_idempotency.rest_framework import ConditionalUpdateMixin, IdempotentMixin
from tests.models import Document


class DocumentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Document
        fields = ["id", "title", "version"]


class DocumentViewSet(ConditionalUpdateMixin, viewsets.ModelViewSet):
    queryset = Document.objects.all()
    serializer_class = DocumentSerializer
    authentication_classes: ClassVar[list[Any]] = []


class RequiredDocumentViewSet(DocumentViewSet):
    conditional_required = True


class KeyedDocumentViewSet(IdempotentMixin, ConditionalUpdateMixin, viewsets.ModelViewSet):
    """Idempotency-Key and If-Match together; PUT is covered too."""

    queryset = Document.objects.all()
    serializer_class = DocumentSerializer
    authentication_classes: ClassVar[list[Any]] = []
    idempotency_methods = ("PUT", "PATCH")
    conditional_required = True


class PrimaryKeyDocumentViewSet(DocumentViewSet):
    def get_etag(self, obj: Any) -> str:
        return format_etag(obj.version, pk=obj.pk)


class RaceDocumentViewSet(DocumentViewSet):
    #: Called once the object is read: the race test holds every request there.
    after_read: ClassVar[Callable[[], object] | None] = None

    def get_object(self) -> Any:
        obj = super().get_object()
        if RaceDocumentViewSet.after_read is not None:
            RaceDocumentViewSet.after_read()
        return obj


router = SimpleRouter()
router.register("documents", DocumentViewSet, basename="documents")
router.register("required", RequiredDocumentViewSet, basename="required")
router.register("keyed", KeyedDocumentViewSet, basename="keyed")
router.register("pk", PrimaryKeyDocumentViewSet, basename="pk")
router.register("race", RaceDocumentViewSet, basename="race")


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
    *router.urls,
    path("function/<int:pk>/", function_document),
    path("function-required/<int:pk>/", function_required),
    path("function-pk/<int:pk>/", function_pk),
    path("function-keyed/<int:pk>/", function_keyed),
]
