"""URLs of the agent's tools, mounted at ``/agent/``."""

from __future__ import annotations

from django.urls import path

from .views import issue_refund, list_refunds, tool_list

urlpatterns = [
    path("tools/", tool_list, name="agent-tools"),
    path("tools/issue_refund/", issue_refund, name="agent-issue-refund"),
    path("tools/list_refunds/", list_refunds, name="agent-list-refunds"),
]
