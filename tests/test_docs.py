"""The docs name every setting, check id and problem code the package defines.

Settings, check ids and codes are discovered from the package itself (by introspection and by
scanning its source), so a new one fails here until the docs describe it.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import django_idempotency
from django_idempotency import conf, exceptions

DOCS = Path(__file__).resolve().parent.parent / "docs"
MKDOCS_YML = DOCS.parent / "mkdocs.yml"
# The installed package: the source tree, or the wheel's copy when tox runs the suite.
PACKAGE = Path(django_idempotency.__file__).resolve().parent


def _package_sources() -> dict[str, str]:
    return {
        str(path.relative_to(PACKAGE)): path.read_text(encoding="utf-8")
        for path in sorted(PACKAGE.rglob("*.py"))
        if "migrations" not in path.parts
    }


def _settings() -> list[str]:
    """Every ``IDEMPOTENCY_*`` setting: ``conf.DEFAULTS``, and any read elsewhere. (A renamed
    setting's old name, ``conf.RENAMED``, is documented under its new name.)"""
    names = set(conf.DEFAULTS)
    read = re.compile(
        r"""getattr\(\s*settings\s*,\s*["'](IDEMPOTENCY_\w+)["']|\bsettings\.(IDEMPOTENCY_\w+)"""
    )
    for source in _package_sources().values():
        for match in read.finditer(source):
            names.add(match.group(1) or match.group(2))
    return sorted(names)


def _check_ids() -> list[str]:
    ids: set[str] = set()
    for source in _package_sources().values():
        ids.update(re.findall(r"\bdjango_idempotency\.[CEIW]\d{3}\b", source))
    return sorted(ids)


def _problem_codes() -> list[str]:
    return sorted(
        {
            cls.default_code
            for _, cls in inspect.getmembers(exceptions, inspect.isclass)
            if issubclass(cls, exceptions.IdempotencyError)
        }
    )


def _read(page: str) -> str:
    return (DOCS / page).read_text(encoding="utf-8")


def _settings_sections() -> dict[str, str]:
    """The settings page cut at its headings: heading text -> the section's body."""
    sections: dict[str, str] = {}
    heading = None
    for line in _read("settings.md").splitlines():
        if match := re.match(r"#{2,4}\s+`?([^`]+?)`?\s*$", line):
            heading = match.group(1)
            sections[heading] = ""
        elif heading is not None:
            sections[heading] += line + "\n"
    return sections


def test_discovery_finds_what_the_package_defines():
    # Guards the tests below against passing because they found nothing to check.
    assert "IDEMPOTENCY_TTL" in _settings()
    assert "django_idempotency.W001" in _check_ids()
    assert "idempotency_key_mismatch" in _problem_codes()


@pytest.mark.parametrize("setting", _settings())
def test_every_setting_has_a_heading_on_the_settings_page(setting):
    assert setting in _settings_sections(), f"docs/settings.md has no heading for {setting}"


@pytest.mark.parametrize("setting", _settings())
def test_every_setting_states_its_type_and_default(setting):
    body = _settings_sections().get(setting, "")
    assert re.search(r"^Default: \S", body, re.MULTILINE), f"no 'Default:' for {setting}"
    assert re.search(r"^Type: \S", body, re.MULTILINE), f"no 'Type:' for {setting}"


def test_the_settings_page_documents_no_setting_the_package_lacks():
    documented = {name for name in _settings_sections() if name.startswith("IDEMPOTENCY_")}
    assert documented <= set(_settings())


@pytest.mark.parametrize("check_id", _check_ids())
def test_every_check_id_has_a_heading_on_the_checks_page(check_id):
    assert re.search(rf"^#{{2,4}}\s+`?{re.escape(check_id)}`?\s*$", _read("checks.md"), re.M)


@pytest.mark.parametrize("code", _problem_codes())
def test_every_problem_code_is_on_the_contract_page(code):
    assert f"`{code}`" in _read("contract.md")


def test_every_page_is_in_the_mkdocs_nav():
    config = MKDOCS_YML.read_text(encoding="utf-8")
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).as_posix()
        assert re.search(rf":\s+{re.escape(name)}\s*$", config, re.M), f"{name} not in the nav"


def _documented_imports() -> list[tuple[str, str]]:
    """Every ``from django_idempotency... import name`` in the docs' code samples."""
    statement = re.compile(r"^from (django_idempotency(?:\.\w+)*) import ([\w, ]+)$", re.M)
    found = set()
    for page in DOCS.rglob("*.md"):
        for module, names in statement.findall(page.read_text(encoding="utf-8")):
            found.update((module, name.strip()) for name in names.split(","))
    return sorted(found)


@pytest.mark.parametrize(("module", "name"), _documented_imports())
def test_every_import_in_the_docs_exists(module, name):
    if module == "django_idempotency.rest_framework":
        pytest.importorskip("rest_framework", reason="Django REST Framework is not installed")
    assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"


@pytest.mark.parametrize(("old", "new"), sorted(conf.RENAMED.items()))
def test_a_renamed_settings_old_name_is_named_in_its_new_section(old, new):
    assert f"`{old}`" in _settings_sections()[new]
