"""Views for the concurrency tests (tests/test_concurrency.py)."""

urlpatterns: list = []
