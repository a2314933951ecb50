"""Build the wheel (or take one) and check what it ships.

In: every file of django_idempotency/ (modules, migrations, templates, py.typed). Out: tests/,
testproject/, docs/ and anything else that is not the package or its metadata. Standard library
only.

    python scripts/check_wheel.py [path/to/django_idempotency-*.whl]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "django_idempotency"
REQUIRED = [
    f"{PACKAGE}/__init__.py",
    f"{PACKAGE}/py.typed",
    f"{PACKAGE}/migrations/__init__.py",
    f"{PACKAGE}/migrations/0001_initial.py",
]


def build_wheel(directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(directory)]
    subprocess.run([*command, str(ROOT)], check=True)
    (wheel,) = directory.glob(f"{PACKAGE}-*.whl")
    return wheel


def problems(wheel: Path) -> list[str]:
    names = set(zipfile.ZipFile(wheel).namelist())
    found = []
    # Every file of the package in the source tree must ship, not only the ones listed above:
    # a template or a subpackage the package data or the package finder misses fails here.
    sources = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / PACKAGE).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )
    for name in sorted(set(REQUIRED) | set(sources)):
        if name not in names:
            found.append(f"missing: {name}")
    for name in sorted(names):
        top = name.split("/", 1)[0]
        if top != PACKAGE and not top.endswith(".dist-info"):
            found.append(f"does not belong in the wheel: {name}")
    return found


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        wheel = Path(argv[0]) if argv else build_wheel(Path(scratch))
        found = problems(wheel)
        for line in found:
            print(f"check_wheel: {line}", file=sys.stderr)
        if found:
            return 1
        count = len(zipfile.ZipFile(wheel).namelist())
        print(f"check_wheel: {wheel.name} ok ({count} files, every file of the package)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
