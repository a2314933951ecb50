"""Benchmark endpoints for ``benchmarks/load_benchmark.py``; not part of the demo.

Only the benchmark's settings (``bench.settings`` for django-idempotency, ``bench.settings_peer``
for the other packages) install this app, so ``python3 dev.py demo`` never sees it.
"""
