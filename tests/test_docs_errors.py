"""The error-code page has a section per problem code; the README's links work off GitHub.

Problem responses link their ``type`` to ``docs/errors.md#<code>``, so each code needs a
heading that is exactly the code (the anchor GitHub and MkDocs derive from it). PyPI renders
the README without the repository, so its links must be absolute.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from django_idempotency import core, exceptions

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _repo_url() -> str:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    match = re.search(r"^repo_url:\s*(\S+)\s*$", config, re.M)
    assert match, "mkdocs.yml has no repo_url"
    return match.group(1)


ERRORS_PAGE = f"{_repo_url()}/blob/main/docs/errors.md"


def _error_classes() -> list[type[exceptions.IdempotencyError]]:
    # Each class once: a former name is an alias of the same class (RequestInvalid).
    found = {
        cls
        for _, cls in inspect.getmembers(exceptions, inspect.isclass)
        if issubclass(cls, exceptions.IdempotencyError)
    }
    return sorted(found, key=lambda cls: cls.__name__)


def _codes() -> list[str]:
    return sorted({cls.default_code for cls in _error_classes()})


def _sections() -> dict[str, str]:
    """docs/errors.md cut at its ``##`` headings: heading text -> the section's body."""
    sections: dict[str, str] = {}
    heading = None
    for line in (DOCS / "errors.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            sections[heading] = ""
        elif heading is not None:
            sections[heading] += line + "\n"
    return sections


def test_the_discovery_finds_the_codes():
    assert "idempotency_store_unavailable" in _codes()


@pytest.mark.parametrize("code", _codes())
def test_every_problem_code_has_a_heading_that_is_exactly_the_code(code):
    assert code in _sections(), f"docs/errors.md has no '## {code}' heading"


def test_the_error_page_has_no_section_for_a_code_the_package_lacks():
    assert set(_sections()) == set(_codes())


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.default_code)
def test_every_section_states_the_status_and_the_exception(cls):
    body = _sections().get(cls.default_code, "")
    assert re.search(rf"^Status: `{cls.status_code}`", body, re.M), cls.default_code
    assert f"`{cls.__name__}`" in body, cls.default_code


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.default_code)
def test_a_problem_type_that_is_a_link_points_at_its_section(cls):
    problem_type = cls("detail").problem()["type"]
    if not problem_type.startswith(("http://", "https://")):
        pytest.skip(f"the problem type is not a link: {problem_type}")
    assert problem_type == f"{ERRORS_PAGE}#{cls.default_code}"


def test_the_cors_page_names_the_headers_a_browser_needs():
    page = (DOCS / "cors.md").read_text(encoding="utf-8")
    assert core.REPLAYED_HEADER in page
    assert "Retry-After" in page
    assert '"idempotency-key"' in page  # the default IDEMPOTENCY_HEADER, as CORS lists it
    assert "CORS_ALLOW_HEADERS" in page
    assert "CORS_EXPOSE_HEADERS" in page


def _readme_links() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    inline = re.findall(r"\]\(\s*<?([^)\s>]+)", readme)  # [text](target), ![alt](target)
    reference = re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?\s*$", readme, re.M)
    html = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']+)""", readme)
    return inline + reference + html


def test_the_readme_has_links():
    assert _readme_links()


@pytest.mark.parametrize("link", _readme_links())
def test_every_readme_link_is_absolute(link):
    # PyPI shows the README without the repository: a relative link leads nowhere there.
    assert re.match(r"https?://", link), f"README.md links to {link!r}; use an absolute URL"


def test_every_error_class_carries_the_idempotency_prefix():
    assert [
        cls.__name__ for cls in _error_classes() if not cls.__name__.startswith("Idempotency")
    ] == []


@pytest.mark.parametrize(
    ("former", "current"),
    [
        ("RequestInvalid", "IdempotencyRequestInvalid"),
        ("StoreUnavailable", "IdempotencyStoreUnavailable"),
    ],
)
def test_a_former_exception_name_is_the_same_class(former, current):
    assert getattr(exceptions, former) is getattr(exceptions, current)
