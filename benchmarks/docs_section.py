"""What every benchmark here does with its figures: write them between two markers of a page."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, start: str, end: str, text: str) -> None:
    """Replace what lies between the lines ``start`` and ``end`` of ``path`` with ``text``."""
    content = path.read_text(encoding="utf-8")
    if start not in content or end not in content:
        raise SystemExit(f"{path} has no {start} ... {end} section to write into")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}", encoding="utf-8")
