"""The package's import graph: no cycles, and no function-level import that is not needed.

Each module must import alone, in a fresh interpreter, once Django is set up: a cycle shows
as an ImportError (or a half-initialised module) for the module that closes it. And an import
inside a function hides such a cycle, or costs every call a lookup, so each one left in the
package is listed below with the reason it cannot be at module level.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import pytest

import django_idempotency

PACKAGE = Path(django_idempotency.__file__).parent
ROOT = PACKAGE.parent
# Modules that need an optional dependency, by what they need.
OPTIONAL = {
    "django_idempotency.rest_framework": "rest_framework",
    "django_idempotency.openapi": "drf_spectacular",
    "django_idempotency.celery": "celery",
}
# (module, imported name) -> why the import is inside a function.
FUNCTION_LEVEL_IMPORTS = {
    # AppConfig.ready() is where Django wants checks registered and extensions imported:
    # at module level, apps.py would import models before the app registry is ready.
    ("django_idempotency.apps", "django_idempotency.checks"): "AppConfig.ready()",
    ("django_idempotency.apps", "django_idempotency.openapi"): "only with drf-spectacular",
    # The cache store is the only place that may import django-redis and redis (an extra).
    ("django_idempotency.stores.cache", "redis.exceptions.RedisError"): "optional dependency",
}


def _modules() -> list[str]:
    names = [
        module.name
        for module in pkgutil.walk_packages([str(PACKAGE)], "django_idempotency.")
        if ".migrations." not in module.name
    ]
    return sorted(
        name for name in names if name not in OPTIONAL or find_spec(OPTIONAL[name]) is not None
    )


def _import_alone(module: str) -> tuple[str, str]:
    code = "import django, importlib, sys; django.setup(); importlib.import_module(sys.argv[1])"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code, module],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
        timeout=120,
    )
    return module, "" if result.returncode == 0 else result.stderr.strip().splitlines()[-1]


def test_each_module_imports_alone_in_a_fresh_interpreter():
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(_import_alone, _modules()))

    assert {module: error for module, error in results.items() if error} == {}
    assert "django_idempotency.models" in results


def _function_level_imports() -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        relative = path.relative_to(ROOT).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    for alias in node.names:
                        found[(module, f"{node.module}.{alias.name}")] = node.lineno
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        found[(module, alias.name)] = node.lineno
    return found


def test_every_function_level_import_has_a_reason():
    found = _function_level_imports()

    assert {
        place: line for place, line in found.items() if place not in FUNCTION_LEVEL_IMPORTS
    } == {}


@pytest.mark.parametrize("place", sorted(FUNCTION_LEVEL_IMPORTS))
def test_each_listed_function_level_import_still_exists(place):
    # A reason for an import that is gone would hide the next one added under its name.
    assert place in _function_level_imports()
