"""URLs of a benchmark server for another package (``bench.settings_peer``)."""

from __future__ import annotations

from django.urls import path

from . import peer_views

urlpatterns = [
    path("bench/ping/", peer_views.ping),
    path("bench/peer/", peer_views.view),
]
