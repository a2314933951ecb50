"""The agent app: HTTP tools an AI agent calls, and the client an agent runtime calls them with."""

from __future__ import annotations

from django.apps import AppConfig


class AgentConfig(AppConfig):
    name = "agent"
    verbose_name = "Agent tools"
    default_auto_field = "django.db.models.BigAutoField"
