"""Idempotency-Key support for Django and Django REST Framework."""

__version__ = "0.1.0"
