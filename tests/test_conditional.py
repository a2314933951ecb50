"""Conditional updates: ETag, If-Match and the compare-and-set behind them (docs/conditional.md).

The parsing and ``compare_and_set`` are tested alone; ``ConditionalUpdateMixin`` through the
test client against tests/conditional_views.py, with and without ``IdempotentMixin``;
``@conditional`` against tests/conditional_function_views.py. The race
of two updates of the same version needs row locks, so it runs on PostgreSQL and MariaDB only.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from importlib.util import find_spec
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.http import JsonResponse
from django.test import Client
from django.test.utils import CaptureQueriesContext

from django_idempotency import conditional as conditional_module
from django_idempotency import exceptions
from django_idempotency.conditional import (
    IfMatch,
    compare_and_set,
    conditional,
    format_etag,
    parse_if_match,
)
from django_idempotency.exceptions import IdempotencyPreconditionFailed, PreconditionError
from django_idempotency.models import IdempotencyKey
from tests.models import Document

HAS_DRF = find_spec("rest_framework") is not None
if HAS_DRF:
    from rest_framework import viewsets

    from django_idempotency.rest_framework import ConditionalUpdateMixin, IdempotentMixin
    from tests.conditional_views import RaceDocumentViewSet

needs_drf = pytest.mark.skipif(not HAS_DRF, reason="DRF is not installed (tox minimal)")
needs_row_locks = pytest.mark.skipif(
    not connection.features.has_select_for_update,
    reason="the race needs a database with row locks: PostgreSQL or MariaDB/MySQL",
)
drf_views = [needs_drf, pytest.mark.django_db, pytest.mark.urls("tests.conditional_views")]


@pytest.fixture
def document(db) -> Document:
    return Document.objects.create(title="draft")


def put(client, document, *, prefix="documents", if_match=None, partial=False, **data):
    headers = {} if if_match is None else {"If-Match": if_match}
    if key := data.pop("key", None):
        headers["Idempotency-Key"] = key
    send = client.patch if partial else client.put
    return send(
        f"/{prefix}/{document.pk}/",
        json.dumps(data or {"title": "final"}),
        content_type="application/json",
        headers=headers,
    )


def delete(client, document, *, prefix="documents", if_match=None, key=None):
    headers = {} if if_match is None else {"If-Match": if_match}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.delete(f"/{prefix}/{document.pk}/", headers=headers)


def stored(document) -> tuple[str, int]:
    row = Document.objects.get(pk=document.pk)
    return row.title, row.version


# -- Entity tags and If-Match ---------------------------------------------------------------


def test_an_etag_is_the_strong_quoted_version_with_an_optional_primary_key():
    assert format_etag(3) == '"3"'
    assert format_etag(3, pk=42) == '"42.3"'


def test_no_header_is_no_precondition():
    assert parse_if_match(None) is None


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("*", IfMatch(any=True)),
        (" * ", IfMatch(any=True)),
        ('"3"', IfMatch(tags=frozenset({'"3"'}))),
        ('"3", "4"', IfMatch(tags=frozenset({'"3"', '"4"'}))),
        ('"3",\t"4",', IfMatch(tags=frozenset({'"3"', '"4"'}))),
        ('"a,b"', IfMatch(tags=frozenset({'"a,b"'}))),  # a comma may sit inside a tag
        ('W/"3"', IfMatch()),  # weak tags never match If-Match
        ('W/"3", "4"', IfMatch(tags=frozenset({'"4"'}))),
        ("3", IfMatch()),  # unquoted: malformed
        ('"3", *', IfMatch()),  # "*" only stands alone
        ('"3" "4"', IfMatch()),
        ("", IfMatch()),
    ],
)
def test_if_match_is_parsed_as_rfc_9110_writes_it(header, parsed):
    assert parse_if_match(header) == parsed


def test_if_match_compares_strongly():
    assert parse_if_match('"3", "4"').matches('"4"')
    assert not parse_if_match('"3"').matches('"4"')
    assert not parse_if_match('W/"4"').matches('"4"')
    assert parse_if_match("*").matches('"4"')


# -- The problems and their documentation ---------------------------------------------------

CONDITIONAL_PAGE = Path(__file__).resolve().parent.parent / "docs" / "conditional.md"
PRECONDITION_ERRORS = sorted(
    {
        cls
        for _, cls in inspect.getmembers(exceptions, inspect.isclass)
        if issubclass(cls, PreconditionError) and cls is not PreconditionError
    },
    key=lambda cls: cls.__name__,
)


def test_the_problems_are_a_412_and_a_428():
    assert [(cls.status_code, cls.default_code) for cls in PRECONDITION_ERRORS] == [
        (412, "precondition_failed"),
        (428, "precondition_required"),
    ]
    assert not any(issubclass(cls, exceptions.IdempotencyError) for cls in PRECONDITION_ERRORS)


@pytest.mark.parametrize("cls", PRECONDITION_ERRORS, ids=lambda cls: cls.default_code)
def test_each_problem_links_its_section_which_states_status_and_exception(cls):
    problem = cls("It changed.").problem()
    page = CONDITIONAL_PAGE.read_text(encoding="utf-8")
    section = page.split(f"\n### {cls.default_code}\n", 1)[1].split("\n#", 1)[0]

    assert problem == {
        "type": f"{exceptions.CONDITIONAL_DOCS_URL}#{cls.default_code}",
        "title": str(cls.default_title),
        "status": cls.status_code,
        "detail": "It changed.",
        "code": cls.default_code,
    }
    assert exceptions.CONDITIONAL_DOCS_URL.endswith("/blob/main/docs/conditional.md")
    assert re.search(rf"^Status: `{cls.status_code}`", section, re.M)
    assert f"`{cls.__name__}`" in section


# -- compare_and_set ------------------------------------------------------------------------


def test_compare_and_set_increments_the_expected_version_in_one_update(document):
    with CaptureQueriesContext(connection) as captured:
        assert compare_and_set(Document, document.pk, 1) == 2

    # Only savepoint statements beside it: no read before or after.
    statements = [query["sql"] for query in captured if "SAVEPOINT" not in query["sql"]]
    assert len(statements) == 1
    assert statements[0].startswith("UPDATE")
    assert stored(document) == ("draft", 2)


def test_compare_and_set_refuses_a_stale_version_and_writes_nothing(document):
    Document.objects.filter(pk=document.pk).update(version=5)

    with pytest.raises(IdempotencyPreconditionFailed):
        compare_and_set(Document.objects.all(), document.pk, 4)

    assert stored(document) == ("draft", 5)


def test_compare_and_set_without_an_expected_version_increments_any(document):
    Document.objects.filter(pk=document.pk).update(version=7)

    assert compare_and_set(Document, document.pk, None) == 8
    assert stored(document) == ("draft", 8)


@pytest.mark.parametrize("expected", [1, None])
def test_compare_and_set_of_a_missing_row_fails_its_precondition(document, expected):
    pk = document.pk
    document.delete()

    with pytest.raises(IdempotencyPreconditionFailed):
        compare_and_set(Document, pk, expected)


def test_compare_and_set_uses_the_version_field_it_is_given(document):
    assert compare_and_set(Document, document.pk, document.pk, version_field="id") == (
        document.pk + 1
    )
    assert Document.objects.filter(pk=document.pk + 1).exists()


# -- ConditionalUpdateMixin -----------------------------------------------------------------


class TestConditionalUpdateMixin:
    pytestmark = drf_views

    def test_a_read_carries_the_versions_etag(self, client, document):
        response = client.get(f"/documents/{document.pk}/")

        assert response.status_code == 200
        assert response["ETag"] == '"1"'

    def test_a_list_carries_no_etag(self, client, document):
        response = client.get("/documents/")

        assert response.status_code == 200
        assert not response.has_header("ETag")

    @pytest.mark.parametrize("partial", [False, True])
    def test_an_update_of_the_current_version_is_written_and_bumps_it(
        self, client, document, partial
    ):
        response = put(client, document, if_match='"1"', partial=partial)

        assert response.status_code == 200
        assert response["ETag"] == '"2"'
        assert response.json()["version"] == 2
        assert stored(document) == ("final", 2)
        assert client.get(f"/documents/{document.pk}/")["ETag"] == '"2"'

    def test_a_stale_if_match_answers_412_and_writes_nothing(self, client, document):
        Document.objects.filter(pk=document.pk).update(title="theirs", version=2)

        response = put(client, document, if_match='"1"')

        assert response.status_code == 412
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["code"] == "precondition_failed"
        assert response.json()["type"].endswith("conditional.md#precondition_failed")
        assert not response.has_header("ETag")
        assert stored(document) == ("theirs", 2)

    def test_a_list_naming_the_current_version_matches(self, client, document):
        response = put(client, document, if_match='"7", "1"')

        assert response.status_code == 200
        assert stored(document) == ("final", 2)

    def test_a_weak_etag_never_matches(self, client, document):
        response = put(client, document, if_match='W/"1"')

        assert response.status_code == 412
        assert stored(document) == ("draft", 1)

    def test_if_match_star_updates_any_version(self, client, document):
        Document.objects.filter(pk=document.pk).update(version=4)

        response = put(client, document, if_match="*")

        assert response.status_code == 200
        assert response["ETag"] == '"5"'
        assert stored(document) == ("final", 5)

    def test_an_update_without_if_match_is_written_and_bumps_the_version(self, client, document):
        response = put(client, document)

        assert response.status_code == 200
        assert response["ETag"] == '"2"'
        assert stored(document) == ("final", 2)

    def test_an_update_without_if_match_answers_428_when_one_is_required(self, client, document):
        response = put(client, document, prefix="required")

        assert response.status_code == 428
        assert response.json()["code"] == "precondition_required"
        assert stored(document) == ("draft", 1)

    def test_a_required_if_match_that_matches_is_written(self, client, document):
        response = put(client, document, prefix="required", if_match='"1"')

        assert response.status_code == 200
        assert stored(document) == ("final", 2)

    def test_the_client_cannot_set_the_version(self, client, document):
        response = put(client, document, if_match='"1"', title="final", version=40)

        assert response.status_code == 200
        assert stored(document) == ("final", 2)

    def test_an_invalid_body_is_refused_before_the_precondition(self, client, document):
        response = put(client, document, if_match='"9"', title="x" * 101)

        assert response.status_code == 400
        assert stored(document) == ("draft", 1)

    def test_a_missing_object_answers_404(self, client, document):
        document.pk += 1000

        assert put(client, document, if_match='"1"').status_code == 404

    def test_an_etag_may_carry_the_primary_key(self, client, document):
        etag = client.get(f"/pk/{document.pk}/")["ETag"]
        assert etag == f'"{document.pk}.1"'

        assert put(client, document, prefix="pk", if_match='"1"').status_code == 412
        response = put(client, document, prefix="pk", if_match=etag)
        assert response.status_code == 200
        assert response["ETag"] == f'"{document.pk}.2"'

    def test_a_delete_of_a_stale_version_answers_412_and_deletes_nothing(self, client, document):
        Document.objects.filter(pk=document.pk).update(title="theirs", version=2)

        response = delete(client, document, if_match='"1"')

        assert response.status_code == 412
        assert response.json()["code"] == "precondition_failed"
        assert stored(document) == ("theirs", 2)

    def test_a_delete_of_the_current_version_deletes(self, client, document):
        response = delete(client, document, if_match='"1"')

        assert response.status_code == 204
        assert not Document.objects.filter(pk=document.pk).exists()

    def test_a_delete_without_if_match_answers_428_when_one_is_required(self, client, document):
        response = delete(client, document, prefix="required")

        assert response.status_code == 428
        assert stored(document) == ("draft", 1)
        assert delete(client, document, prefix="required", if_match='"1"').status_code == 204


class TestWithIdempotencyKey:
    pytestmark = drf_views

    def test_a_retried_update_is_replayed_without_a_second_bump(self, client, document):
        first = put(client, document, prefix="keyed", if_match='"1"', key="edit-1")
        retry = put(client, document, prefix="keyed", if_match='"1"', key="edit-1")

        assert first.status_code == retry.status_code == 200
        assert retry.content == first.content
        assert retry["ETag"] == first["ETag"] == '"2"'
        assert retry["Idempotent-Replayed"] == "true"
        assert stored(document) == ("final", 2)

    def test_a_412_is_not_stored_and_frees_the_key(self, client, document):
        Document.objects.filter(pk=document.pk).update(version=2)

        refused = put(client, document, prefix="keyed", if_match='"1"', key="edit-1")

        assert refused.status_code == 412
        assert not IdempotencyKey.objects.exists()
        assert stored(document) == ("draft", 2)
        # The same key, after reading the resource again, runs the update.
        retry = put(client, document, prefix="keyed", if_match='"2"', key="edit-1")
        assert retry.status_code == 200
        assert not retry.has_header("Idempotent-Replayed")
        assert stored(document) == ("final", 3)

    def test_a_428_is_not_stored_and_frees_the_key(self, client, document):
        refused = put(client, document, prefix="keyed", key="edit-1")

        assert refused.status_code == 428
        assert not IdempotencyKey.objects.exists()
        assert stored(document) == ("draft", 1)

    def test_an_update_without_a_key_is_still_conditional(self, client, document):
        assert put(client, document, prefix="keyed", if_match='"1"').status_code == 200
        assert put(client, document, prefix="keyed", if_match='"1"').status_code == 412
        assert stored(document) == ("final", 2)


# -- @conditional on function views -----------------------------------------------------------

function_views = [pytest.mark.django_db, pytest.mark.urls("tests.conditional_function_views")]


class TestConditionalDecorator:
    pytestmark = function_views

    def test_a_read_carries_the_etag_of_the_version_it_shows(self, client, document):
        response = client.get(f"/function/{document.pk}/")

        assert response.status_code == 200
        assert response["ETag"] == '"1"'
        assert response.json()["version"] == 1

    def test_a_missing_object_is_the_views_404_without_an_etag(self, client, document):
        document.pk += 1000

        assert not client.get(f"/function/{document.pk}/").has_header("ETag")
        assert put(client, document, prefix="function", if_match='"1"').status_code == 404
        assert delete(client, document, prefix="function", if_match='"1"').status_code == 404

    @pytest.mark.parametrize("partial", [False, True])
    def test_an_update_of_the_current_version_is_written_and_bumps_it(
        self, client, document, partial
    ):
        response = put(client, document, prefix="function", if_match='"1"', partial=partial)

        assert response.status_code == 200
        assert response["ETag"] == '"2"'
        assert stored(document) == ("final", 2)

    def test_a_stale_if_match_answers_412_and_the_view_never_runs(self, client, document):
        Document.objects.filter(pk=document.pk).update(title="theirs", version=2)

        response = put(client, document, prefix="function", if_match='"1"')

        assert response.status_code == 412
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["code"] == "precondition_failed"
        assert not response.has_header("ETag")
        assert stored(document) == ("theirs", 2)

    @pytest.mark.parametrize("if_match", ['W/"1"', "1", '"1", *'])
    def test_a_weak_or_malformed_if_match_answers_412(self, client, document, if_match):
        assert put(client, document, prefix="function", if_match=if_match).status_code == 412
        assert stored(document) == ("draft", 1)

    @pytest.mark.parametrize("if_match", [None, "*"])
    def test_without_a_precondition_any_version_is_updated_and_bumped(
        self, client, document, if_match
    ):
        Document.objects.filter(pk=document.pk).update(version=4)

        response = put(client, document, prefix="function", if_match=if_match)

        assert response.status_code == 200
        assert response["ETag"] == '"5"'
        assert stored(document) == ("final", 5)

    def test_a_view_refusing_the_update_rolls_the_version_back(self, client, document):
        response = put(client, document, prefix="function", if_match='"1"', title="x" * 101)

        assert response.status_code == 400
        assert not response.has_header("ETag")
        assert stored(document) == ("draft", 1)

    def test_a_required_precondition_answers_428_without_if_match(self, client, document):
        refused = put(client, document, prefix="function-required")

        assert refused.status_code == 428
        assert refused.json()["code"] == "precondition_required"
        assert stored(document) == ("draft", 1)
        assert put(client, document, prefix="function-required", if_match='"1"').status_code == 200

    def test_a_delete_of_a_stale_version_answers_412_and_deletes_nothing(self, client, document):
        Document.objects.filter(pk=document.pk).update(version=2)

        assert delete(client, document, prefix="function", if_match='"1"').status_code == 412
        assert stored(document) == ("draft", 2)
        response = delete(client, document, prefix="function", if_match='"2"')
        assert response.status_code == 204
        assert not response.has_header("ETag")
        assert not Document.objects.filter(pk=document.pk).exists()

    def test_an_etag_may_carry_the_primary_key(self, client, document):
        etag = client.get(f"/function-pk/{document.pk}/")["ETag"]
        assert etag == f'"{document.pk}.1"'

        assert put(client, document, prefix="function-pk", if_match='"1"').status_code == 412
        response = put(client, document, prefix="function-pk", if_match=etag)
        assert response.status_code == 200
        assert response["ETag"] == f'"{document.pk}.2"'

    def test_under_idempotent_a_412_is_not_stored_and_frees_the_key(self, client, document):
        Document.objects.filter(pk=document.pk).update(version=2)

        refused = put(client, document, prefix="function-keyed", if_match='"1"', key="edit-1")

        assert refused.status_code == 412
        assert not IdempotencyKey.objects.exists()
        retry = put(client, document, prefix="function-keyed", if_match='"2"', key="edit-1")
        assert retry.status_code == 200
        assert not retry.has_header("Idempotent-Replayed")
        assert stored(document) == ("final", 3)

    def test_under_idempotent_a_428_is_not_stored(self, client, document):
        assert put(client, document, prefix="function-keyed", key="edit-1").status_code == 428
        assert not IdempotencyKey.objects.exists()

    def test_under_idempotent_a_retry_is_replayed_without_a_second_bump(self, client, document):
        first = put(client, document, prefix="function-keyed", if_match='"1"', key="edit-1")
        retry = put(client, document, prefix="function-keyed", if_match='"1"', key="edit-1")

        assert first.status_code == retry.status_code == 200
        assert retry["Idempotent-Replayed"] == "true"
        assert retry["ETag"] == first["ETag"] == '"2"'
        assert stored(document) == ("final", 2)


def _view(request, pk):
    raise AssertionError("never called")


@pytest.mark.parametrize(
    ("arguments", "options", "message"),
    [
        (
            ("Document",),
            {},
            r"the first argument must be a model class or a queryset, not 'Document' \(str\)",
        ),
        ((Document,), {"version_field": "revision"}, r"Document has no field 'revision'"),
        ((Document,), {"version_field": "title"}, r"Document.title must be an integer field"),
        ((Document,), {"required": "yes"}, r"required must be True or False, not 'yes'"),
        ((Document,), {"with_pk": 1}, r"with_pk must be True or False, not 1 \(int\)"),
        ((Document,), {"methods": "PUT"}, r"methods must be a list or tuple"),
        ((Document,), {"methods": ["GET"]}, r"methods must be some of PUT, PATCH and DELETE"),
        ((Document,), {"methods": []}, r"methods must be some of PUT, PATCH and DELETE"),
        ((Document,), {"url_kwarg": ""}, r"url_kwarg must be a non-empty string"),
        ((Document,), {"lookup_field": None}, r"lookup_field must be a non-empty string"),
        (
            (Document,),
            {"lookup_field": "slug"},
            r"lookup_field names 'slug', which is not a field of Document",
        ),
    ],
)
def test_a_wrong_option_is_refused_when_the_view_is_decorated(arguments, options, message):
    with pytest.raises(ImproperlyConfigured, match=rf"^@conditional: {message}"):
        conditional(*arguments, **options)(_view)


def test_an_async_view_is_refused_when_it_is_decorated():
    async def view(request, pk):
        raise AssertionError("never called")

    with pytest.raises(
        TypeError, match=r"cannot wrap the async view .*view: .* Make the view sync"
    ):
        conditional(Document)(view)


@pytest.mark.django_db
def test_a_url_without_the_lookup_argument_names_what_it_gives(rf, document):
    view = conditional(Document, url_kwarg="document_id")(_view)

    with pytest.raises(
        ImproperlyConfigured, match=r"no 'document_id' argument \(it gives \['pk'\]\)"
    ):
        view(rf.put("/"), pk=document.pk)


def _rename(request, pk):
    """Rename any document, found without @conditional's queryset; a 404 for "abc"."""
    if not str(pk).isdigit() or not Document.objects.filter(pk=pk).exists():
        return JsonResponse({}, status=404)
    if request.method in ("PUT", "PATCH"):
        Document.objects.filter(pk=pk).update(title="renamed")
    return JsonResponse({"title": "renamed"})


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["get", "put", "delete"])
def test_a_url_value_the_lookup_field_cannot_hold_is_the_views_404(rf, document, method):
    # <str:pk> in the URL: "abc" cannot be an integer key (was a ValueError, a 500).
    view = conditional(Document)(_rename)

    response = view(getattr(rf, method)("/", headers={"If-Match": '"1"'}), pk="abc")

    assert response.status_code == 404
    assert stored(document) == ("draft", 1)


@pytest.mark.django_db
def test_a_write_to_an_object_the_queryset_hides_fails_its_if_match(rf, document):
    # The view finds the document that @conditional's queryset does not show: the stale
    # If-Match was never compared, so the write is rolled back and answered 412.
    Document.objects.filter(pk=document.pk).update(version=5)
    view = conditional(Document.objects.filter(title="published"))(_rename)

    response = view(rf.put("/", headers={"If-Match": '"1"'}), pk=document.pk)

    assert response.status_code == 412
    assert json.loads(response.content)["code"] == "precondition_failed"
    assert stored(document) == ("draft", 5)
    # Without If-Match there is nothing to compare: the view's answer stands.
    assert view(rf.put("/"), pk=document.pk).status_code == 200
    assert stored(document) == ("renamed", 5)


@needs_row_locks
@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
@pytest.mark.urls("tests.conditional_function_views")
def test_of_two_simultaneous_function_view_updates_of_one_version_one_is_written(monkeypatch):
    document = Document.objects.create(title="draft")
    # Both requests read version 1 and pass the If-Match check before either increments it.
    barrier = threading.Barrier(2, timeout=10)
    real = conditional_module.compare_and_set

    def after_the_check(*args, **kwargs):
        barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(conditional_module, "compare_and_set", after_the_check)
    statuses: list[int] = []
    errors: list[BaseException] = []

    def update(title: str) -> None:
        try:
            response = put(Client(), document, prefix="function", if_match='"1"', title=title)
            statuses.append(response.status_code)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            connection.close()

    threads = [threading.Thread(target=update, args=(f"writer {n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert not errors
    assert sorted(statuses) == [200, 412]
    title, version = stored(document)
    assert version == 2
    assert title in ("writer 0", "writer 1")


@needs_drf
def test_the_mixin_listed_after_drfs_class_is_refused():
    with pytest.raises(TypeError, match=r"class Late\(ConditionalUpdateMixin, ModelViewSet\)"):

        class Late(viewsets.ModelViewSet, ConditionalUpdateMixin):
            pass


@needs_drf
@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        # Were 500s (AttributeError) at every request, or a text column "incremented".
        (
            {"conditional_version_field": "revision"},
            r"^Wrong: Document has no field 'revision' to hold its version; add a "
            r"PositiveIntegerField\(default=1\) or set conditional_version_field\.",
        ),
        (
            {"conditional_version_field": "title"},
            r"^Wrong: Document\.title must be an integer field",
        ),
        (
            {"conditional_version_field": None},
            r"^Wrong: conditional_version_field must be a non-empty string, not None",
        ),
        (
            {"conditional_required": "no"},
            r"^Wrong: conditional_required must be True or False, not 'no' \(str\)",
        ),
    ],
)
def test_a_wrong_mixin_attribute_is_refused_when_the_class_is_made(attributes, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        type(
            "Wrong",
            (ConditionalUpdateMixin, viewsets.ModelViewSet),
            {"queryset": Document.objects.all(), **attributes},
        )


@needs_drf
def test_the_mixin_listed_before_idempotent_mixin_is_refused():
    with pytest.raises(
        TypeError,
        match=r"class Early\(IdempotentMixin, ConditionalUpdateMixin, ModelViewSet\)",
    ):

        class Early(ConditionalUpdateMixin, IdempotentMixin, viewsets.ModelViewSet):
            pass


# -- The race -------------------------------------------------------------------------------


@needs_drf
@needs_row_locks
@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
@pytest.mark.urls("tests.conditional_views")
def test_of_two_simultaneous_updates_of_one_version_exactly_one_is_written(monkeypatch):
    document = Document.objects.create(title="draft")
    # Both requests read version 1 before either writes, so both pass the early If-Match
    # check and meet at the compare-and-set.
    barrier = threading.Barrier(2, timeout=10)
    monkeypatch.setattr(RaceDocumentViewSet, "after_read", barrier.wait)
    statuses: list[int] = []
    errors: list[BaseException] = []

    def update(title: str) -> None:
        try:
            response = put(Client(), document, prefix="race", if_match='"1"', title=title)
            statuses.append(response.status_code)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            connection.close()  # this thread's own connection

    threads = [threading.Thread(target=update, args=(f"writer {n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert not errors
    assert sorted(statuses) == [200, 412]
    title, version = stored(document)
    assert version == 2
    assert title in ("writer 0", "writer 1")
