"""The ``IdempotencyKey`` admin: read-only inspection, fast lists, safe actions.

The suite's URLconf has no admin; this module mounts one (``urlpatterns`` below).
"""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from urllib.parse import parse_qs

import pytest
from django.contrib import admin
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext
from django.urls import path, reverse

from django_idempotency.admin import CappedCountPaginator, IdempotencyKeyAdmin, render_body
from django_idempotency.models import IdempotencyKey
from tests.factories import IdempotencyKeyFactory, UserFactory

urlpatterns = [path("admin/", admin.site.urls)]

pytestmark = [pytest.mark.django_db, pytest.mark.urls(__name__)]

CHANGELIST = "admin:django_idempotency_idempotencykey_changelist"


def changelist(client, **params):
    response = client.get(reverse(CHANGELIST), params)
    assert response.status_code == 200, response.content[:500]
    return response


def listed(response):
    """The keys in the changelist, in order."""
    return [key.key for key in response.context["cl"].result_list]


def detail(client, key):
    url = reverse("admin:django_idempotency_idempotencykey_change", args=[key.pk])
    response = client.get(url)
    assert response.status_code == 200
    return response.content.decode()


def staff(*codenames):
    user = UserFactory(is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="django_idempotency", codename__in=codenames
        )
    )
    return user


def set_created(key, when):
    IdempotencyKey.objects.filter(pk=key.pk).update(created_at=when)


def expire(*keys):
    IdempotencyKey.objects.filter(pk__in=[key.pk for key in keys]).update(
        expires_at=Now() - timedelta(hours=1)
    )


def run_action(client, action, keys=(), **extra):
    data = {"action": action, ACTION_CHECKBOX_NAME: [key.pk for key in keys], **extra}
    return client.post(reverse(CHANGELIST), data, follow=True)


def messages_of(response):
    return [str(message) for message in response.context["messages"]]


# -- Registration and permissions ---------------------------------------------------------------


def test_the_model_is_registered_with_the_read_only_admin():
    assert isinstance(admin.site._registry[IdempotencyKey], IdempotencyKeyAdmin)


def test_nothing_can_be_added_edited_or_deleted_one_by_one(admin_client):
    key = IdempotencyKeyFactory(completed=True)
    change = reverse("admin:django_idempotency_idempotencykey_change", args=[key.pk])

    assert (
        admin_client.get(reverse("admin:django_idempotency_idempotencykey_add")).status_code == 403
    )
    assert admin_client.post(change, {"key": "changed"}).status_code == 403
    delete = reverse("admin:django_idempotency_idempotencykey_delete", args=[key.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    page = detail(admin_client, key)
    assert 'name="_save"' not in page
    assert "deletelink" not in page
    assert IdempotencyKey.objects.get(pk=key.pk).key == key.key


def test_only_the_two_safe_actions_are_offered(admin_client):
    IdempotencyKeyFactory()

    choices = [
        name for name, _ in changelist(admin_client).context["action_form"].fields["action"].choices
    ]

    assert choices == ["", "purge_expired", "release_stale"]


def test_actions_need_the_delete_permission(client):
    IdempotencyKeyFactory()
    client.force_login(staff("view_idempotencykey"))

    response = changelist(client)

    assert response.context["action_form"] is None
    assert run_action(client, "purge_expired").status_code == 200
    assert IdempotencyKey.objects.count() == 1


def test_a_user_without_view_or_change_permission_cannot_look(client):
    key = IdempotencyKeyFactory(completed=True)
    client.force_login(staff("delete_idempotencykey"))

    assert client.get(reverse(CHANGELIST)).status_code == 403
    url = reverse("admin:django_idempotency_idempotencykey_change", args=[key.pk])
    assert client.get(url).status_code == 403


def test_stored_responses_are_shown_with_the_view_permission(client):
    key = IdempotencyKeyFactory(completed=True, response_body=b'{"card": "4242"}')
    client.force_login(staff("view_idempotencykey"))

    page = detail(client, key)

    assert "4242" in page
    assert "Content-Type" in page


def test_stored_responses_are_hidden_without_the_view_permission(client):
    key = IdempotencyKeyFactory(
        completed=True,
        response_body=b'{"card": "4242"}',
        response_headers=[["Content-Type", "application/json"], ["X-Secret", "s3cret"]],
    )
    # The change permission lets a user into the (read-only) admin, but not see responses.
    client.force_login(staff("change_idempotencykey", "delete_idempotencykey"))

    page = detail(client, key)

    assert "4242" not in page
    assert "s3cret" not in page
    assert "Hidden: stored responses can hold personal data" in page
    assert "201 Created" in page
    assert key.key in page


def test_recovery_points_are_shown_with_their_results_only_with_the_view_permission(client):
    key = IdempotencyKeyFactory(
        in_progress=True, recovery_points=[["order", 17], ["payment", {"charge": "ch_4242"}]]
    )
    client.force_login(staff("view_idempotencykey"))
    page = detail(client, key)
    assert "<th>order</th><td><code>17</code></td>" in page
    assert "ch_4242" in page

    client.force_login(staff("change_idempotencykey"))
    page = detail(client, key)
    assert "order, payment" in page
    assert "ch_4242" not in page


def test_a_key_without_phases_says_so(admin_client):
    page = detail(admin_client, IdempotencyKeyFactory(completed=True))

    assert "None: the request committed no phase." in page


# -- The changelist -----------------------------------------------------------------------------


def test_changelist_shows_the_columns_newest_first(admin_client):
    old = IdempotencyKeyFactory(completed=True, key="old-key", scope="user:7", path="/orders/")
    set_created(old, datetime(2025, 1, 2, tzinfo=dt_timezone.utc))
    new = IdempotencyKeyFactory(in_progress=True, key="new-key", method="PATCH")

    response = changelist(admin_client)

    assert listed(response) == [new.key, old.key]
    page = response.content.decode()
    for header in [
        "Key",
        "Scope",
        "Method",
        "Path",
        "State",
        "Status",
        "Created at",
        "Expires at",
        "Age",
    ]:
        assert f">{header}<" in page or f">{header}</a>" in page, header
    assert "user:7" in page
    assert "/orders/" in page
    assert "in progress" in page


def test_long_paths_are_shortened_in_the_list(admin_client):
    IdempotencyKeyFactory(path="/" + "a" * 300)

    page = changelist(admin_client).content.decode()

    assert "a" * 300 not in page
    assert "a" * 50 + "…" in page or "a" * 58 + "…" in page


def test_changelist_never_counts_the_whole_table(admin_client):
    IdempotencyKeyFactory.create_batch(3, completed=True)

    with CaptureQueriesContext(connection) as queries:
        response = changelist(admin_client)

    key_queries = [q["sql"] for q in queries if "django_idempotency_idempotencykey" in q["sql"]]
    counts = [sql for sql in key_queries if "COUNT(" in sql.upper()]
    assert counts, "the paginator counts, with a limit"
    assert all("LIMIT" in sql.upper() for sql in counts)
    assert not any("DISTINCT" in sql.upper() for sql in key_queries)
    assert "response_body" not in key_queries[-1] or "LIMIT" not in key_queries[-1]
    assert len(listed(response)) == 3


def test_the_list_query_does_not_fetch_stored_bodies(admin_client):
    IdempotencyKeyFactory(completed=True)

    with CaptureQueriesContext(connection) as queries:
        changelist(admin_client)

    [listing] = [
        q["sql"]
        for q in queries
        if "django_idempotency_idempotencykey" in q["sql"]
        and "ORDER BY" in q["sql"]
        and "COUNT(" not in q["sql"].upper()
    ]
    assert "response_body" not in listing
    assert "response_headers" not in listing


def test_the_count_is_not_ordered(admin_client):
    IdempotencyKeyFactory()

    with CaptureQueriesContext(connection) as queries:
        changelist(admin_client)

    [count] = [q["sql"] for q in queries if "COUNT(" in q["sql"].upper()]
    assert "ORDER BY" not in count.upper()
    assert "LIMIT 1001" in count.upper()


def test_counts_stop_at_the_limit_and_the_list_says_so(admin_client, monkeypatch):
    monkeypatch.setattr(CappedCountPaginator, "limit", 3)
    IdempotencyKeyFactory.create_batch(5)

    response = changelist(admin_client)

    assert response.context["cl"].result_count == 3
    assert response.context["cl"].paginator.capped
    assert "counts stop at 3" in response.content.decode()


def test_counts_under_the_limit_are_exact(admin_client):
    IdempotencyKeyFactory.create_batch(2)

    response = changelist(admin_client)

    assert response.context["cl"].result_count == 2
    assert not response.context["cl"].paginator.capped
    assert "counts stop at" not in response.content.decode()


def test_facets_are_never_counted(admin_client):
    IdempotencyKeyFactory()

    response = changelist(admin_client, _facets="1")

    assert "Show counts" not in response.content.decode()
    assert not response.context["cl"].add_facets


def test_only_indexed_columns_sort(admin_client):
    first, second = IdempotencyKeyFactory.create_batch(2)
    set_created(first, datetime(2025, 1, 1, tzinfo=dt_timezone.utc))

    response = changelist(admin_client)

    assert IdempotencyKeyAdmin.sortable_by == ("created_at", "expires_at", "age")
    assert listed(changelist(admin_client, o="-9")) == [first.key, second.key]  # oldest first
    assert listed(response) == [second.key, first.key]


# -- Filters ------------------------------------------------------------------------------------


def test_state_filter(admin_client):
    running = IdempotencyKeyFactory(in_progress=True)
    stale = IdempotencyKeyFactory(in_progress=True)
    IdempotencyKey.objects.filter(pk=stale.pk).update(lease_until=Now() - timedelta(seconds=1))
    done = IdempotencyKeyFactory(completed=True)

    assert set(listed(changelist(admin_client, state="in_progress"))) == {running.key, stale.key}
    assert listed(changelist(admin_client, state="stale")) == [stale.key]
    assert listed(changelist(admin_client, state="completed")) == [done.key]
    assert len(listed(changelist(admin_client))) == 3


def test_status_class_filter(admin_client):
    created = IdempotencyKeyFactory(completed=True, response_status=201)
    missing = IdempotencyKeyFactory(completed=True, response_status=404)
    failed = IdempotencyKeyFactory(completed=True, response_status=503)
    IdempotencyKeyFactory(in_progress=True)

    assert listed(changelist(admin_client, status="2xx")) == [created.key]
    assert listed(changelist(admin_client, status="4xx")) == [missing.key]
    assert listed(changelist(admin_client, status="5xx")) == [failed.key]
    assert listed(changelist(admin_client, status="3xx")) == []
    assert len(listed(changelist(admin_client, status="bogus"))) == 4


def test_expiry_filter_uses_the_database_clock(admin_client, app_clock):
    live = IdempotencyKeyFactory()
    ended = IdempotencyKeyFactory()
    expire(ended)
    app_clock(timedelta(days=3))  # an app server far ahead would call both expired

    assert listed(changelist(admin_client, expiry="live")) == [live.key]
    assert listed(changelist(admin_client, expiry="expired")) == [ended.key]


def test_method_filter_offers_the_unsafe_methods_and_the_covered_ones(admin_client, settings):
    settings.IDEMPOTENCY_METHODS = ["POST", "MKCOL"]
    post = IdempotencyKeyFactory(method="POST")
    IdempotencyKeyFactory(method="PUT")

    response = changelist(admin_client, method="POST")

    assert listed(response) == [post.key]
    [spec] = [
        spec for spec in response.context["cl"].filter_specs if spec.parameter_name == "method"
    ]
    assert [value for value, _ in spec.lookup_choices] == [
        "DELETE",
        "MKCOL",
        "PATCH",
        "POST",
        "PUT",
    ]


def test_method_filter_survives_a_malformed_setting(admin_client, settings):
    settings.IDEMPOTENCY_METHODS = 7  # reported by check E003

    response = changelist(admin_client)

    [spec] = [
        spec for spec in response.context["cl"].filter_specs if spec.parameter_name == "method"
    ]
    assert [value for value, _ in spec.lookup_choices] == ["DELETE", "PATCH", "POST", "PUT"]


# -- Search -------------------------------------------------------------------------------------


def test_search_finds_a_key_exactly_across_scopes(admin_client):
    alice = IdempotencyKeyFactory(key="order-7", scope="user:1")
    bob = IdempotencyKeyFactory(key="order-7", scope="user:2")
    IdempotencyKeyFactory(key="order-70", scope="user:1")

    assert set(listed(changelist(admin_client, q="order-7"))) == {alice.key}
    assert {
        key.scope for key in changelist(admin_client, q="order-7").context["cl"].result_list
    } == {"user:1", "user:2"}
    assert bob.key == alice.key


def test_search_finds_a_scope_exactly(admin_client):
    mine = IdempotencyKeyFactory(scope="user:4")
    IdempotencyKeyFactory(scope="user:42")

    assert listed(changelist(admin_client, q=" user:4 ")) == [mine.key]


@pytest.mark.parametrize("term", ["\0", "order\0", "/api/\0"])
def test_search_for_a_term_holding_nul_is_refused_on_every_database(admin_client, term):
    # PostgreSQL refuses NUL in a text parameter: Django's search form refuses such a term
    # (ProhibitNullCharactersValidator) before get_search_results() could send it.
    IdempotencyKeyFactory(key="other")

    response = changelist(admin_client, q=term)

    assert "Null characters are not allowed." in response.content.decode()


def test_search_by_path_prefix(admin_client):
    order = IdempotencyKeyFactory(path="/api/orders/12/")
    IdempotencyKeyFactory(path="/api/payments/")

    assert listed(changelist(admin_client, q="/api/orders/")) == [order.key]
    assert listed(changelist(admin_client, q="/api/order")) == [order.key]


def test_search_is_exact_not_a_substring(admin_client):
    IdempotencyKeyFactory(key="abcdef")

    assert listed(changelist(admin_client, q="bcd")) == []
    assert listed(changelist(admin_client, q="abcde")) == []


def test_search_box_explains_what_it_matches(admin_client):
    page = changelist(admin_client).content.decode()

    assert "exactly as stored" in page


# -- The date hierarchy -------------------------------------------------------------------------


def created(*moments):
    keys = []
    for moment in moments:
        key = IdempotencyKeyFactory()
        set_created(key, moment)
        keys.append(key)
    return keys


def hierarchy(response):
    links = response.context["cl"].date_hierarchy_links
    return [choice["title"] for choice in links["choices"]], links["back"]


def test_date_hierarchy_lists_years_between_the_first_and_last_key(admin_client):
    created(
        datetime(2023, 5, 1, tzinfo=dt_timezone.utc), datetime(2025, 2, 1, tzinfo=dt_timezone.utc)
    )

    with CaptureQueriesContext(connection) as queries:
        response = changelist(admin_client)

    assert hierarchy(response) == (["2023", "2024", "2025"], None)
    assert not any("DISTINCT" in q["sql"].upper() for q in queries)
    page = response.content.decode()
    assert "created_at__year=2024" in page


def test_date_hierarchy_opens_on_the_only_year(admin_client):
    created(
        datetime(2025, 3, 1, tzinfo=dt_timezone.utc), datetime(2025, 5, 9, tzinfo=dt_timezone.utc)
    )

    titles, back = hierarchy(changelist(admin_client))

    assert titles == ["March 2025", "April 2025", "May 2025"]
    assert back["title"] == "All dates"


def test_date_hierarchy_opens_on_the_only_month(admin_client):
    created(
        datetime(2025, 3, 3, tzinfo=dt_timezone.utc), datetime(2025, 3, 5, tzinfo=dt_timezone.utc)
    )

    titles, back = hierarchy(changelist(admin_client))

    assert titles == ["March 3", "March 4", "March 5"]
    assert back["title"] == "2025"


def test_date_hierarchy_drills_down_within_the_first_and_last_key(admin_client):
    first, _, last = created(
        datetime(2024, 12, 30, tzinfo=dt_timezone.utc),
        datetime(2025, 3, 3, tzinfo=dt_timezone.utc),
        datetime(2025, 3, 9, tzinfo=dt_timezone.utc),
    )

    by_year = changelist(admin_client, created_at__year="2025")
    assert hierarchy(by_year)[0] == ["January 2025", "February 2025", "March 2025"]
    assert hierarchy(changelist(admin_client, created_at__year="2024"))[0] == ["December 2024"]
    by_month = changelist(admin_client, created_at__year="2025", created_at__month="3")
    assert hierarchy(by_month)[0] == [f"March {day}" for day in range(1, 10)]
    december = changelist(admin_client, created_at__year="2024", created_at__month="12")
    assert hierarchy(december)[0] == ["December 30", "December 31"]
    by_day = changelist(
        admin_client, created_at__year="2025", created_at__month="3", created_at__day="9"
    )
    titles, back = hierarchy(by_day)
    assert titles == ["March 9"]
    assert back["title"] == "March 2025"
    assert listed(by_day) == [last.key]
    assert first.key not in listed(by_year)


def test_date_hierarchy_reads_only_the_ends_of_the_index_whatever_the_filters(admin_client):
    created(
        datetime(2024, 5, 1, tzinfo=dt_timezone.utc), datetime(2025, 2, 1, tzinfo=dt_timezone.utc)
    )

    with CaptureQueriesContext(connection) as queries:
        response = changelist(admin_client, state="in_progress", created_at__year="2025")

    aggregates = [q["sql"] for q in queries if "MIN(" in q["sql"].upper()]
    assert len(aggregates) == 1
    assert "WHERE" not in aggregates[0].upper()
    assert hierarchy(response)[0] == ["January 2025", "February 2025"]


def test_expired_keys_are_listed_most_recently_expired_first(admin_client):
    older, newer = IdempotencyKeyFactory.create_batch(2)
    IdempotencyKey.objects.filter(pk=older.pk).update(expires_at=Now() - timedelta(days=2))
    IdempotencyKey.objects.filter(pk=newer.pk).update(expires_at=Now() - timedelta(days=1))
    set_created(newer, datetime(2020, 1, 1, tzinfo=dt_timezone.utc))  # created first, yet

    assert listed(changelist(admin_client, expiry="expired")) == [newer.key, older.key]
    # A column the user sorts by wins.
    assert listed(changelist(admin_client, expiry="expired", o="7")) == [newer.key, older.key]
    assert listed(changelist(admin_client, expiry="expired", o="-7")) == [older.key, newer.key]


def test_date_hierarchy_of_an_empty_list(admin_client):
    assert hierarchy(changelist(admin_client)) == ([], None)
    assert hierarchy(changelist(admin_client, created_at__year="2020")) == (
        [],
        {"link": "?", "title": "All dates"},
    )
    titles, _ = hierarchy(changelist(admin_client, created_at__year="2020", created_at__month="1"))
    assert titles == []


# -- URL parameters: the list is no oracle -----------------------------------------------------
#
# A user without the view permission must not find out stored responses (or recovery points'
# results) by guessing them in the list's URL and watching which keys it shows. The list takes
# only the parameters its own links carry; Django answers any other lookup with
# DisallowedModelAdminLookup, a 400 response.

CHANGE_ONLY = ("change_idempotencykey", "delete_idempotencykey")
SECRETS = {
    "response_body": b'{"card": "4242"}',
    "response_headers": [["Content-Type", "application/json"], ["X-Secret", "s3cret"]],
    "recovery_points": [["order", 17], ["payment", {"charge": "ch_4242"}]],
}


def secret_key():
    """A completed key holding a secret in each hidden field, and a key without any."""
    IdempotencyKeyFactory(completed=True)
    return IdempotencyKeyFactory(completed=True, **SECRETS)


def assert_refused(response, key):
    assert response.status_code == 400, (response.status_code, response.get("Location"))
    assert key.key not in response.content.decode()


def offered_links(response):
    """The query strings of the list's own links: filters, dates, sorted columns, clear-all."""
    page = response.content.decode()
    return {html.unescape(link) for link in re.findall(r'href="(\?[^"]*)"', page)}


@pytest.mark.parametrize(
    "lookup",
    ["response_body__contains", "response_body__startswith", "response_body__gte", "response_body"],
)
def test_change_only_user_cannot_filter_on_response_body_through_the_url(client, lookup):
    key = secret_key()
    client.force_login(staff(*CHANGE_ONLY))

    assert_refused(client.get(reverse(CHANGELIST), {lookup: '{"card": "4242"}'}), key)


@pytest.mark.parametrize(
    ("lookup", "guess"),
    [
        ("response_headers__icontains", "s3cret"),
        ("response_headers__contains", '[["X-Secret", "s3cret"]]'),
        ("response_headers__1__1", "s3cret"),
        ("response_headers__1__1__startswith", "s3"),
    ],
)
def test_change_only_user_cannot_filter_on_response_headers_through_the_url(client, lookup, guess):
    key = secret_key()
    client.force_login(staff(*CHANGE_ONLY))

    assert_refused(client.get(reverse(CHANGELIST), {lookup: guess}), key)


@pytest.mark.parametrize(
    ("lookup", "guess"),
    [
        ("recovery_points__icontains", "ch_4242"),
        ("recovery_points__1__1__charge", "ch_4242"),
        ("recovery_points__1__1__has_key", "charge"),
        ("recovery_points__isnull", "False"),
    ],
)
def test_change_only_user_cannot_filter_on_recovery_point_results_through_the_url(
    client, lookup, guess
):
    key = secret_key()
    client.force_login(staff(*CHANGE_ONLY))

    assert_refused(client.get(reverse(CHANGELIST), {lookup: guess}), key)


@pytest.mark.parametrize(
    ("lookup", "guess"),
    [
        ("owner_token__startswith", "a"),
        ("fingerprint__startswith", "0"),
        ("state__in", "completed"),
        ("method__regex", "^P"),
        ("created_at__gte", "2000-01-01"),
        ("created_at__year__gte", "2000"),
        ("id__gt", "0"),
        ("scope", "anonymous"),
    ],
)
def test_lookups_the_list_does_not_offer_are_refused_even_on_fields_it_shows(client, lookup, guess):
    # An allowlist, not a list of hidden fields: a field added to the model later stays hidden
    # from the URL until the list offers a filter on it.
    key = secret_key()
    client.force_login(staff(*CHANGE_ONLY))

    assert_refused(client.get(reverse(CHANGELIST), {lookup: guess}), key)


def test_users_who_may_see_responses_get_only_the_offered_lookups_too(client):
    key = secret_key()
    client.force_login(staff("view_idempotencykey"))

    assert_refused(client.get(reverse(CHANGELIST), {"response_body__contains": "4242"}), key)
    assert_refused(client.get(reverse(CHANGELIST), {"recovery_points__isnull": "False"}), key)


def test_an_offered_filter_does_not_carry_a_hidden_lookup_along(client):
    key = secret_key()
    client.force_login(staff(*CHANGE_ONLY))

    response = client.get(
        reverse(CHANGELIST), {"state": "completed", "response_headers__icontains": "s3cret"}
    )

    assert_refused(response, key)


def test_actions_cannot_select_keys_by_a_hidden_field_through_the_url(client):
    # "Purge all matching keys" would otherwise say how many keys held the guess.
    key = secret_key()
    expire(*IdempotencyKey.objects.all())
    client.force_login(staff(*CHANGE_ONLY))

    url = reverse(CHANGELIST) + "?response_body__contains=4242"
    data = {"action": "purge_expired", "select_across": "1", ACTION_CHECKBOX_NAME: [key.pk]}
    response = client.post(url, data)

    assert_refused(response, key)
    assert IdempotencyKey.objects.count() == 2


def test_a_subclass_field_filter_keeps_its_parameters_and_only_those(rf):
    class ScopeFilteringAdmin(IdempotencyKeyAdmin):
        list_filter = (*IdempotencyKeyAdmin.list_filter, "scope")

    model_admin = ScopeFilteringAdmin(IdempotencyKey, admin.site)
    request = rf.get("/")

    assert model_admin.lookup_allowed("scope__exact", "user:42", request)
    assert model_admin.lookup_allowed("state", "completed", request)
    assert model_admin.lookup_allowed("created_at__month", "3", request)
    assert not model_admin.lookup_allowed("scope", "user:42", request)
    assert not model_admin.lookup_allowed("response_body__contains", "4242", request)


def test_the_url_cannot_sort_by_a_column_the_list_does_not_sort(client):
    # ``?o=`` numbers the list's columns; none of them shows a hidden field, and only the
    # sortable ones (served by an index) sort.
    assert {"response_body", "response_headers", "recovery_points"}.isdisjoint(
        IdempotencyKeyAdmin.list_display
    )
    # Each other column, one way or the other, orders the two keys otherwise than newest first.
    older = IdempotencyKeyFactory(key="a", scope="a", method="DELETE", path="/a/")
    newer = IdempotencyKeyFactory(key="z", scope="z", method="PUT", path="/z/", completed=True)
    set_created(older, datetime(2025, 1, 1, tzinfo=dt_timezone.utc))
    set_created(newer, datetime(2025, 1, 2, tzinfo=dt_timezone.utc))
    client.force_login(staff(*CHANGE_ONLY))
    sortable = {"created_at", "expires_at"}
    # The list's columns, as ``?o=`` numbers them: the action checkbox comes first.
    columns = changelist(client).context["cl"].list_display
    assert columns == ["action_checkbox", *IdempotencyKeyAdmin.list_display]

    for index, column in enumerate(columns):
        for order in (str(index), f"-{index}"):
            response = changelist(client, o=order)
            fields = {
                str(field).lstrip("-") for field in response.context["cl"].queryset.query.order_by
            }
            if column in IdempotencyKeyAdmin.sortable_by:
                assert fields & sortable, (column, fields)
            else:
                assert fields <= sortable | {"pk"}, (column, fields)
                assert listed(response) == [newer.key, older.key], column


def test_method_filter_ignores_a_method_it_does_not_offer(client):
    # As the other filters ignore values they do not offer; PostgreSQL refused a NUL with a 500.
    post, put = IdempotencyKeyFactory(method="POST"), IdempotencyKeyFactory(method="PUT")
    client.force_login(staff(*CHANGE_ONLY))

    assert listed(changelist(client, method="PUT")) == [put.key]
    assert listed(changelist(client, method="\x00")) == [put.key, post.key]
    assert listed(changelist(client, method="GET")) == [put.key, post.key]


DRILL_DOWN = {"created_at__year", "created_at__month", "created_at__day"}


@pytest.mark.parametrize("permissions", [CHANGE_ONLY, ("view_idempotencykey",)])
def test_every_link_the_list_offers_still_works_with_or_without_stored_responses(
    client, permissions
):
    created(
        datetime(2024, 12, 30, tzinfo=dt_timezone.utc), datetime(2025, 1, 2, tzinfo=dt_timezone.utc)
    )
    IdempotencyKeyFactory(completed=True, method="PUT", **SECRETS)
    client.force_login(staff(*permissions))
    root = changelist(client)
    cl = root.context["cl"]
    choices = {choice["query_string"] for spec in cl.filter_specs for choice in spec.choices(cl)}
    assert len(cl.filter_specs) == len(IdempotencyKeyAdmin.list_filter)

    visited = set()
    pages = [root]
    while pages:  # every link of the list, and those of the dates it drills down to in 2024
        page = pages.pop()
        for link in sorted(offered_links(page) - visited):
            visited.add(link)
            response = client.get(reverse(CHANGELIST) + link)
            assert response.status_code == 200, link
            dates = parse_qs(link[1:])
            if dates.get("created_at__year") == ["2024"] and set(dates) < DRILL_DOWN:
                pages.append(response)
    assert {
        "?created_at__year=2024",
        "?created_at__month=12&created_at__year=2024",
        "?created_at__day=31&created_at__month=12&created_at__year=2024",
    } <= visited
    assert choices <= visited
    completed = changelist(client, state="completed", method="PUT", status="2xx")
    assert len(listed(completed)) == 1


# -- The detail page ----------------------------------------------------------------------------


def test_detail_page_pretty_prints_a_json_body_and_tabulates_headers(admin_client):
    key = IdempotencyKeyFactory(
        completed=True,
        response_body=b'{"id":7,"items":[{"sku":"A"}]}',
        response_headers=[["Content-Type", "application/json"], ["Location", "/orders/7"]],
    )

    page = detail(admin_client, key)

    assert "{\n  &quot;id&quot;: 7,\n  &quot;items&quot;: [" in page
    assert '<tr><th scope="row">Location</th><td><code>/orders/7</code></td></tr>' in page
    assert "201 Created" in page
    assert f"<code>{key.fingerprint}</code>" in page


def test_detail_page_escapes_a_text_body(admin_client):
    key = IdempotencyKeyFactory(
        completed=True,
        response_body=b"<script>alert(1)</script>",
        response_headers=[["Content-Type", "text/html; charset=utf-8"], ["X-Evil", "<b>"]],
    )

    page = detail(admin_client, key)

    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<code>&lt;b&gt;</code>" in page


def test_detail_page_of_a_running_request(admin_client):
    key = IdempotencyKeyFactory(in_progress=True)

    page = detail(admin_client, key)

    assert "None yet: the request has not finished." in page
    assert "live for another" in page


def test_detail_page_of_an_expired_key(admin_client):
    key = IdempotencyKeyFactory(completed=True, expired=True)

    assert "expired 1" in detail(admin_client, key)


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (b'{"b":1,"a":[]}', [["Content-Type", "application/json"]], '{\n  "b": 1,\n  "a": []\n}'),
        (b'{"x":1}', [["content-type", "application/problem+json"]], '{\n  "x": 1\n}'),
        (b'{"x":1}', [["Content-Type", "application/vnd.api+json"]], '{\n  "x": 1\n}'),
        (b"{not json", [["Content-Type", "application/json"]], "{not json"),
        (b"plain words", [["Content-Type", "text/plain"]], "plain words"),
        (b"no content type", [], "no content type"),
        (b"caf\xe9", [["Content-Type", "text/plain; charset=latin-1"]], "café"),
        (b"a=1&b=2", [["Content-Type", "application/x-www-form-urlencoded"]], "a=1&amp;b=2"),
    ],
)
def test_text_bodies_are_shown(body, headers, expected):
    key = IdempotencyKeyFactory.build(completed=True, response_body=body, response_headers=headers)

    rendered = render_body(key)

    assert rendered.startswith("<pre")
    assert expected.replace('"', "&quot;") in rendered


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (
            b"\x89PNG\r\n\x1a\n\x00\x00",
            [["Content-Type", "image/png"]],
            "Binary, 10 bytes (image/png).",
        ),
        (
            b"hello",
            [["Content-Type", "application/octet-stream"]],
            "Binary, 5 bytes (application/octet-stream).",
        ),
        (b"\xff\xfe\x00", [], "Binary, 3 bytes."),
        (b"bell\x07", [["Content-Type", "text/plain"]], "Binary, 5 bytes (text/plain)."),
        (
            b"x" * 1234,
            [["Content-Type", "text/plain; charset=nonsense"]],
            "Binary, 1,234 bytes (text/plain).",
        ),
    ],
)
def test_binary_bodies_are_shown_as_a_size(body, headers, expected):
    key = IdempotencyKeyFactory.build(completed=True, response_body=body, response_headers=headers)

    assert render_body(key) == expected


def test_long_bodies_are_cut():
    key = IdempotencyKeyFactory.build(
        completed=True,
        response_body=b"x" * 25_000,
        response_headers=[["Content-Type", "text/plain"]],
    )

    rendered = render_body(key)

    assert "x" * 20_000 + "</pre>" in rendered
    assert "x" * 20_001 not in rendered
    assert rendered.endswith("Showing the first 20,000 of 25,000 characters.")


def test_bodies_that_were_not_stored_or_are_empty():
    not_stored = IdempotencyKeyFactory.build(completed=True, response_body=None)
    empty = IdempotencyKeyFactory.build(completed=True, response_body=b"")

    assert render_body(not_stored).startswith("Not stored: the response was streamed")
    assert render_body(empty) == "Empty."


def test_status_without_a_known_phrase_and_headers_when_none():
    key = IdempotencyKeyFactory.build(completed=True, response_status=299, response_headers=[])
    model_admin = admin.site._registry[IdempotencyKey]

    assert model_admin.status_display(key) == "299"
    assert model_admin.headers_table(key) == "None stored."


# -- Actions ------------------------------------------------------------------------------------


def test_purge_action_deletes_only_the_expired_keys_of_the_selection(admin_client):
    expired, live, other_expired = IdempotencyKeyFactory.create_batch(3, completed=True)
    expire(expired, other_expired)

    response = run_action(admin_client, "purge_expired", [expired, live])

    assert messages_of(response) == [
        "Deleted 1 expired key.",
        "Kept 1 selected key: not expired yet, or in use by a request.",
    ]
    assert set(IdempotencyKey.objects.values_list("pk", flat=True)) == {live.pk, other_expired.pk}


def test_purge_action_keeps_an_unfinished_key_whose_lease_still_runs(admin_client):
    running = IdempotencyKeyFactory(in_progress=True)
    expire(running)

    response = run_action(admin_client, "purge_expired", [running])

    assert messages_of(response) == [
        "Deleted 0 expired keys.",
        "Kept 1 selected key: not expired yet, or in use by a request.",
    ]
    assert IdempotencyKey.objects.filter(pk=running.pk).exists()


def test_purge_action_on_every_matching_key(admin_client):
    keys = IdempotencyKeyFactory.create_batch(3, completed=True)
    expire(*keys)
    IdempotencyKeyFactory(completed=True)

    response = run_action(admin_client, "purge_expired", keys[:1], select_across="1")

    assert messages_of(response) == ["Deleted 3 expired keys."]
    assert IdempotencyKey.objects.count() == 1


def test_purge_action_respects_the_filters_when_acting_on_every_matching_key(admin_client):
    mine = IdempotencyKeyFactory.create_batch(2, completed=True, scope="user:1")
    theirs = IdempotencyKeyFactory(completed=True, scope="user:2")
    expire(*mine, theirs)
    url = reverse(CHANGELIST) + "?q=user:1"
    data = {"action": "purge_expired", ACTION_CHECKBOX_NAME: [mine[0].pk], "select_across": "1"}

    response = admin_client.post(url, data, follow=True)

    assert messages_of(response) == ["Deleted 2 expired keys."]
    assert list(IdempotencyKey.objects.values_list("pk", flat=True)) == [theirs.pk]


def test_release_action_frees_stuck_keys_only(admin_client):
    stuck = IdempotencyKeyFactory(in_progress=True)
    IdempotencyKey.objects.filter(pk=stuck.pk).update(lease_until=Now() - timedelta(seconds=1))
    running = IdempotencyKeyFactory(in_progress=True)
    done = IdempotencyKeyFactory(completed=True)

    response = run_action(admin_client, "release_stale", [stuck, running, done])

    assert messages_of(response) == [
        "Released 1 stuck key: its next request runs the view.",
        "Kept 2 selected keys: completed, or held by a request still running.",
    ]
    assert set(IdempotencyKey.objects.values_list("pk", flat=True)) == {running.pk, done.pk}


def test_release_action_with_nothing_to_release(admin_client):
    done = IdempotencyKeyFactory(completed=True)

    response = run_action(admin_client, "release_stale", [done])

    assert messages_of(response)[0] == "Released 0 stuck keys: their next request runs the view."


def test_release_action_on_every_matching_key(admin_client):
    stuck = IdempotencyKeyFactory.create_batch(2, in_progress=True)
    IdempotencyKey.objects.update(lease_until=Now() - timedelta(seconds=1))

    response = run_action(admin_client, "release_stale", stuck[:1], select_across="1")

    assert messages_of(response) == ["Released 2 stuck keys: their next request runs the view."]


def test_an_operator_with_change_and_delete_permissions_can_purge(client):
    key = IdempotencyKeyFactory(completed=True)
    expire(key)
    client.force_login(staff("change_idempotencykey", "delete_idempotencykey"))

    response = run_action(client, "purge_expired", [key])

    assert messages_of(response) == ["Deleted 1 expired key."]


def test_the_changelist_is_usable_with_many_keys_per_page(admin_client):
    IdempotencyKeyFactory.create_batch(60)

    response = changelist(admin_client)

    assert len(listed(response)) == 50
    assert response.context["cl"].multi_page
    assert listed(changelist(admin_client, p="2")) != listed(response)
    assert re.search(r"60\s+idempotency keys", response.content.decode())
