"""The ``# NOTE [ title ]`` essays of the package, read from its files (no Sphinx, no import).

Used by the Sphinx extension :mod:`mirror_docs` (the design-notes page) and by
``tests/api/test_docs.py`` (every note a page links to exists).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

__all__ = ["Note", "ROOMS", "collect_notes", "note_label", "source_files", "module_summaries"]

#: A NOTE heading: ``# NOTE [ title ]`` at the start of a comment line, perhaps followed by text.
_HEADING = re.compile(r"^(?P<indent>\s*)# NOTE \[ (?P<title>.+?) \](?P<rest>.*)$")
#: Rooms of the package, in the order the page lists them (first path part under the package).
ROOMS: Tuple[Tuple[str, str], ...] = (
    ("core", "The core (pure Python, no MXNet)"),
    ("mx", "The MXNet adapter"),
    ("planning", "Planning"),
    ("", "Public surfaces"),
    ("gluon", "Gluon"),
    ("compat", "memonger compatibility"),
    ("tools", "Command-line tools"),
)


@dataclass
class Note:
    """One ``NOTE [ title ]`` essay: where it is written and its text."""

    title: str
    path: str
    line: int
    text: List[str]
    #: Other files that name the note (``path:line``), for the reader who wants the code.
    mentions: List[str] = field(default_factory=list)
    #: Whether the heading line holds the title alone (an essay's own heading does; a line
    #: that names a note and goes on, ``# NOTE [ x ] in y.py: ...``, is usually a mention).
    heading_only: bool = True

    @property
    def room(self) -> str:
        parts = Path(self.path).parts
        return parts[1] if len(parts) > 2 else ""


def note_label(title: str) -> str:
    """The Sphinx label of the essay ``title`` (``note-`` and a lower-case slug)."""
    return "note-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _block(lines: List[str], start: int, indent: str) -> List[str]:
    """The comment lines of the essay whose heading is ``lines[start]``, without ``# ``."""
    heading = _HEADING.match(lines[start])
    rest = heading.group("rest").lstrip(" :") if heading else ""
    text = [rest] if rest else []
    for line in lines[start + 1:]:
        stripped = line.strip()
        if not line.startswith(indent) or not (stripped == "#" or stripped.startswith("# ")):
            break
        if _HEADING.match(line):  # the next essay starts
            break
        text.append(stripped[2:])
    while text and not text[-1]:
        text.pop()
    return text


def source_files(package: Path) -> Iterator[Path]:
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path


def collect_notes(package: Path) -> List[Note]:
    """Every essay of ``package`` (one per title: where a title repeats, the longest text, and
    among equals one under a heading of its own, else the first found).

    Parameters
    ----------
    package : Path
        The package directory (``mxnet_mirror_hook``); paths are given relative to its parent.

    Returns
    -------
    list of Note
        Sorted by room (:data:`ROOMS`), then path and line.
    """
    found: Dict[str, List[Note]] = {}
    for path in source_files(package):
        relative = path.relative_to(package.parent).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            heading = _HEADING.match(line)
            if heading:
                note = Note(heading.group("title"), relative, number + 1,
                            _block(lines, number, heading.group("indent")),
                            heading_only=not heading.group("rest").strip())
                found.setdefault(note.title, []).append(note)
    notes = []
    for versions in found.values():
        essay = max(versions, key=lambda note: (len(note.text), note.heading_only))
        essay.mentions = [f"{other.path}:{other.line}" for other in versions if other is not essay]
        notes.append(essay)
    order = {room: index for index, (room, _) in enumerate(ROOMS)}
    return sorted(notes, key=lambda note: (order.get(note.room, len(order)), note.path, note.line))


def module_summaries(package: Path) -> List[Tuple[str, str]]:
    """``(path, first paragraph of the docstring)`` of every module of ``package``, by path.

    Read with :mod:`ast`, so nothing is imported; a module without a docstring gets ``''``.
    Private modules (``_version.py``) are left out, packages' ``__init__.py`` kept.
    """
    summaries = []
    for path in source_files(package):
        if path.name.startswith("_") and path.name != "__init__.py":
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
        shown = path.parent if path.name == "__init__.py" else path
        summaries.append((shown.relative_to(package.parent).as_posix() + ("/" if shown.is_dir() else ""),
                          paragraph))
    return sorted(summaries)
