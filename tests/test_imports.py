"""The package's import graph: no cycles, and no function-level import that is not needed.

Each module must import alone, in a fresh interpreter, once Django is set up: a cycle shows
as an ImportError (or a half-initialised module) for the module that closes it. And an import
inside a function hides such a cycle, or costs every call a lookup, so each one left in the
package is listed below with the reason it cannot be at module level.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from django.db import connection

import django_idempotency

PACKAGE = Path(django_idempotency.__file__).parent
ROOT = PACKAGE.parent
# Where ``tests`` lives: beside the package in a checkout, elsewhere when tox runs the suite
# against the installed wheel.
TESTS_ROOT = Path(__file__).resolve().parent.parent
# Modules that need an optional dependency, by what they need.
OPTIONAL = {
    "django_idempotency.rest_framework": "rest_framework",
    "django_idempotency.openapi": "drf_spectacular",
    "django_idempotency.celery": "celery",
    "django_idempotency.client": "httpx",
}
# (module, imported name) -> why the import is inside a function.
FUNCTION_LEVEL_IMPORTS = {
    # AppConfig.ready() is where Django wants checks registered and extensions imported:
    # at module level, apps.py would import models before the app registry is ready.
    ("django_idempotency.apps", "django_idempotency.checks"): "AppConfig.ready()",
    ("django_idempotency.apps", "django_idempotency.openapi"): "only with drf-spectacular",
    # The cache store is the only place that may import django-redis and redis (an extra).
    ("django_idempotency.stores.cache", "redis.exceptions.RedisError"): "optional dependency",
    ("django_idempotency.stores.cache", "redis.exceptions.AskError"): "optional dependency",
    ("django_idempotency.stores.cache", "redis.cluster.RedisCluster"): "optional dependency",
    # psycopg 3 is PostgreSQL's driver: absent on MariaDB/SQLite-only installs (psycopg2 too).
    ("django_idempotency.stores.sql", "psycopg"): "optional dependency",
    # cryptography is the `encryption` extra, imported only once keys are configured.
    ("django_idempotency.encryption", "cryptography.fernet.Fernet"): "optional dependency",
    ("django_idempotency.encryption", "cryptography.fernet.MultiFernet"): "optional dependency",
    ("django_idempotency.encryption", "cryptography.fernet.InvalidToken"): "optional dependency",
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


# One fresh interpreter imports Django and the third-party libraries once, then forks a child
# per module: each child sets Django up and imports its module, with no module of this
# package imported before (the parent never imports one). Much faster than an interpreter
# per module, and as fresh where it matters.
_FORKING_IMPORTER = """
import importlib, json, os, sys
import django, django.db.models, django.http
for optional in ("rest_framework", "drf_spectacular", "celery", "django_redis", "httpx"):
    try:
        importlib.import_module(optional)
    except ImportError:
        pass
assert not [name for name in sys.modules if name.startswith("django_idempotency")]
def start(module):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            django.setup()
            importlib.import_module(module)
        except BaseException as exc:
            os.write(write, f"{type(exc).__name__}: {exc}".encode()[:4000])
            os._exit(1)
        os._exit(0)
    os.close(write)
    return module, pid, read
failures, waiting, queue = {}, [], list(sys.argv[1:])
while queue or waiting:
    while queue and len(waiting) < 4:
        waiting.append(start(queue.pop()))
    module, pid, read = waiting.pop(0)
    message = os.read(read, 8192).decode()
    os.close(read)
    if os.waitpid(pid, 0)[1] != 0:
        failures[module] = message or "the child died"
print(json.dumps(failures))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module (POSIX)")
@pytest.mark.skipif(
    connection.vendor != "sqlite",
    reason="the import graph is the same on every database: checked in the SQLite run",
)
def test_each_module_imports_alone_in_a_fresh_interpreter():
    modules = _modules()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": os.pathsep.join([str(TESTS_ROOT), str(ROOT)]),
    }
    result = subprocess.run(
        [sys.executable, "-c", _FORKING_IMPORTER, *modules],
        capture_output=True,
        text=True,
        cwd=TESTS_ROOT,
        env=env,
        check=False,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}
    assert "django_idempotency.models" in modules


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
