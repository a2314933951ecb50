"""Build the sdist and the wheel, check what each ships, and run the tests from the sdist.

The sdist is built from a copy of the working tree (so no build/, *.egg-info or a stale
SOURCES.txt is left in it or read from it), and the wheel from the sdist, as a release does
with `python -m build`. Then:

- wheel: every file of django_idempotency/ (modules, migrations, templates, py.typed) and
  nothing but the package and its .dist-info;
- sdist: the package, LICENSE, README.md, pyproject.toml, setup.cfg, MANIFEST.in, and what
  the suite needs to run from it: every file of tests/ (conftest.py, settings, factories and
  the helper modules, not only test_*.py), requirements/test.txt, mkdocs.yml and docs/*.md
  (tests/test_docs.py reads them). Nothing else: not testproject/, benchmarks/, scripts/, .ci/,
  dev.py, tox.ini or docs/img/, and never __pycache__, *.pyc, .coverage*, *.sqlite3 or dotfiles;
- the test suite, run from the unpacked sdist with this interpreter on SQLite, as a distro
  packager would (about 25 s; what this interpreter lacks, such as DRF or Redis, is skipped).

Standard library only; builds with `build` (pip install build), or bootstraps it into a
throwaway virtualenv when this interpreter lacks it.

    python scripts/check_wheel.py               # build, check both, run the suite from the sdist
    python scripts/check_wheel.py --no-tests    # build and check the contents only
    python scripts/check_wheel.py DIST...       # check these .whl / .tar.gz files instead
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "django_idempotency"
REQUIRED = [
    f"{PACKAGE}/__init__.py",
    f"{PACKAGE}/py.typed",
    f"{PACKAGE}/migrations/__init__.py",
    f"{PACKAGE}/migrations/0001_initial.py",
    f"{PACKAGE}/templates/admin/{PACKAGE}/idempotencykey/change_list.html",
]
# Besides the package, every file of these folders of the source tree is in the sdist: the
# suite, and the pages tests/test_docs.py reads.
SDIST_TREES = {"tests": "*", "docs": "*.md"}
SDIST_FILES = [
    "PKG-INFO",
    "LICENSE",
    "README.md",
    "pyproject.toml",
    "setup.cfg",
    "MANIFEST.in",
    "mkdocs.yml",
    "requirements/test.txt",
    # Named although SDIST_TREES covers them: the suite cannot even start without them.
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/settings.py",
    "tests/factories.py",
]
# What a run, an editor or a build leaves behind; it never ships.
JUNK = ["*.py[cod]", ".coverage", ".coverage.*", "*.sqlite3", "*.sqlite3-*", "*~"]
# Not copied into the tree the sdist is built from: too big, or build output (at the top level).
NOT_COPIED = {".git", ".venv", "venv", ".tox", ".nox", "build", "dist", ".eggs", "site"}
# Environment that would take the suite off SQLite, demand services or switch settings.
SCRUBBED_ENV = [
    "DATABASE_URL",
    "REDIS_URL",
    "TEST_DATABASE_NAME",
    "IDEMPOTENCY_REQUIRE_SERVICES",
    "DJANGO_SETTINGS_MODULE",
    "COVERAGE_PROCESS_START",
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "PYTHONPATH",
]


def say(message: str) -> None:
    print(f"check_wheel: {message}", flush=True)


def is_junk(relative: str) -> bool:
    parts = relative.split("/")
    if any(part == "__pycache__" or part.startswith(".") for part in parts):
        return True
    return any(fnmatch.fnmatch(parts[-1], pattern) for pattern in JUNK)


def files_under(directory: Path, pattern: str = "*") -> list[str]:
    """The files of a top-level folder of a source tree, as paths relative to that tree."""
    base = directory.parent
    return sorted(
        relative
        for path in directory.rglob("*")
        if path.is_file()
        and fnmatch.fnmatch(path.name, pattern)
        and not is_junk(relative := path.relative_to(base).as_posix())
    )


# --- building ---------------------------------------------------------------------------------


def copy_tree(destination: Path) -> Path:
    """Copy the working tree for the build, leaving out VCS, virtualenvs and build output."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        if Path(directory) == ROOT:
            return {n for n in names if n in NOT_COPIED or n.endswith(".egg-info")}
        # The load benchmark's peer virtualenvs (benchmarks/.work) are large.
        return {".work"} & set(names) if Path(directory) == ROOT / "benchmarks" else set()

    shutil.copytree(ROOT, destination, ignore=ignore, symlinks=True)
    return destination


def build_frontend(scratch: Path) -> list[str]:
    """A command that runs `build`: this interpreter's, or one bootstrapped for this run."""
    if importlib.util.find_spec("build") is not None:
        return [sys.executable, "-m", "build"]
    say("`build` is not installed here: installing it into a throwaway virtualenv")
    environment = scratch / "build-env"
    venv.create(environment, with_pip=True)
    python = environment / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "build"]
    subprocess.run(pip, check=True)
    return [str(python), "-m", "build"]


def build(scratch: Path) -> tuple[Path, Path, Path]:
    """Build the sdist, then the wheel from it; return them and the tree they came from."""
    source = copy_tree(scratch / "source")
    out = scratch / "dist"
    command = [*build_frontend(scratch), "--outdir", str(out), str(source)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        print(result.stdout + result.stderr, file=sys.stderr)
        raise SystemExit("check_wheel: the build failed (output above)")
    (sdist,) = out.glob(f"{PACKAGE}-*.tar.gz")
    (wheel,) = out.glob(f"{PACKAGE}-*.whl")
    return sdist, wheel, source


# --- checking ---------------------------------------------------------------------------------


def wheel_problems(wheel: Path, source: Path) -> list[str]:
    names = set(zipfile.ZipFile(wheel).namelist())
    found = []
    # Every file of the package in the source tree must ship, not only the ones listed above:
    # a template or a subpackage the package data or the package finder misses fails here.
    for name in sorted(set(REQUIRED) | set(files_under(source / PACKAGE))):
        if name not in names:
            found.append(f"{wheel.name}: missing: {name}")
    for name in sorted(names):
        top = name.split("/", 1)[0]
        if (top != PACKAGE and not top.endswith(".dist-info")) or is_junk(name):
            found.append(f"{wheel.name}: does not belong in the wheel: {name}")
    return found


def sdist_names(sdist: Path) -> set[str]:
    """The files of the sdist, without its top folder (django_idempotency-X.Y.Z/)."""
    with tarfile.open(sdist) as archive:
        return {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}


def sdist_problems(sdist: Path, source: Path) -> list[str]:
    names = sdist_names(sdist)
    expected = set(REQUIRED) | set(SDIST_FILES) | set(files_under(source / PACKAGE))
    for tree, pattern in SDIST_TREES.items():
        expected |= set(files_under(source / tree, pattern))
    found = [f"{sdist.name}: missing: {name}" for name in sorted(expected - names)]
    for name in sorted(names - expected):
        # setuptools' metadata (PKG-INFO, SOURCES.txt, requires.txt...) is expected as it is.
        if not name.startswith(f"{PACKAGE}.egg-info/") or is_junk(name):
            found.append(f"{sdist.name}: does not belong in the sdist: {name}")
    return found


def unpack(sdist: Path, destination: Path) -> Path:
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):  # 3.12, and security releases of 3.10 and 3.11
            archive.extractall(destination, filter="data")
        else:
            archive.extractall(destination)  # our own archive, just built
    (unpacked,) = destination.iterdir()
    return unpacked


def run_tests(sdist: Path, scratch: Path) -> bool:
    """Run the suite from the unpacked sdist, with this interpreter, on SQLite."""
    if importlib.util.find_spec("pytest") is None:
        say("pytest is not installed here: pip install -r requirements/test.txt, or --no-tests")
        return False
    unpacked = unpack(sdist, scratch / f"unpacked-{sdist.name}")
    environment = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    # pytest puts the sdist's folder first on sys.path (pythonpath = ["."]): the package and
    # tests/ must come from there, not from the working tree (an editable install) or elsewhere.
    probe = "import django_idempotency as p, tests as t; print(p.__file__); print(t.__file__)"
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, '.'); {probe}"]
    where = subprocess.run(command, cwd=unpacked, env=environment, capture_output=True, text=True)
    paths = [Path(line).resolve() for line in where.stdout.splitlines()]
    if where.returncode or not all(path.is_relative_to(unpacked.resolve()) for path in paths):
        print(where.stdout + where.stderr, file=sys.stderr)
        say(f"the package or tests/ is not imported from the unpacked sdist {unpacked}")
        return False
    say(f"running the test suite from the unpacked {sdist.name} (SQLite)")
    started = time.monotonic()
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"]
    result = subprocess.run(pytest, cwd=unpacked, env=environment, capture_output=True, text=True)
    lines = (result.stdout + result.stderr).strip().splitlines()
    if result.returncode:
        print("\n".join(lines), file=sys.stderr)
        say(f"the suite failed from the sdist (pytest exit status {result.returncode})")
        return False
    summary = lines[-1].strip("= ") if lines else "no output"
    say(f"suite from the sdist: {summary} ({time.monotonic() - started:.0f} s)")
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("dist", nargs="*", type=Path, help="built .whl / .tar.gz files to check")
    parser.add_argument("--no-tests", action="store_true", help="do not run the suite")
    options = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="check-wheel-") as directory:
        scratch = Path(directory)
        if options.dist:
            wheels = [p for p in options.dist if p.suffix == ".whl"]
            sdists = [p for p in options.dist if p.name.endswith(".tar.gz")]
            source = ROOT
        else:
            sdist, wheel, source = build(scratch)
            wheels, sdists = [wheel], [sdist]
        found = [line for wheel in wheels for line in wheel_problems(wheel, source)]
        found += [line for sdist in sdists for line in sdist_problems(sdist, source)]
        for line in found:
            print(f"check_wheel: {line}", file=sys.stderr)
        if found:
            return 1
        for wheel in wheels:
            count = len(zipfile.ZipFile(wheel).namelist())
            say(f"{wheel.name} ok ({count} files, every file of the package)")
        for sdist in sdists:
            say(f"{sdist.name} ok ({len(sdist_names(sdist))} files: the package, tests, docs)")
        if not options.no_tests and not all(run_tests(sdist, scratch) for sdist in sdists):
            return 1
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
