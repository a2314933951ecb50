"""Copy the test suite away from the source tree, so tox tests the installed wheel.

Run from the repository root, pytest would put the root on sys.path (`pythonpath = ["."]` and
the rootdir of a `tests` package) and import django_idempotency from the source tree, hiding a
wheel that lacks a migration or py.typed. tox runs this into its env's temporary folder, then
pytest there: `tests` is importable, the package only from site-packages.

    python scripts/stage_tests.py DEST
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the tests may read besides themselves: the docs (test_docs.py) and pytest's settings.
COPIED = ["tests", "docs", "README.md", "mkdocs.yml", "pyproject.toml"]


def main(destination: Path) -> int:
    destination.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source, target = ROOT / name, destination / name
        if target.is_dir():
            shutil.rmtree(target)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, target)
    spec = importlib.util.find_spec("django_idempotency")
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    # The env lives under .tox/ inside the repository, so compare with the source package.
    if origin is None or origin.is_relative_to(ROOT / "django_idempotency"):
        print(f"stage_tests: django_idempotency is not installed from the wheel: {origin}")
        return 1
    print(f"stage_tests: tests staged in {destination}; django_idempotency from {origin.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
