"""DRF viewsets with conditional updates (``ConditionalUpdateMixin``), and their URLs.

Used by tests/test_conditional.py through ``pytest.mark.urls("tests.conditional_views")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from rest_framework import serializers, viewsets
from rest_framework.routers import SimpleRouter

from django_idempotency.conditional import format_etag
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


urlpatterns = router.urls
