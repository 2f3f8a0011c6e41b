"""Sections of bench/RESULTS.md that separate bench scripts own, between marker comments.

``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``: a script replaces its own
section in place (or appends it) and leaves the rest of the file alone;
``bench_memory.py``, which writes the file's head, keeps every section.
"""
from __future__ import annotations

import os
import re
from typing import List

__all__ = ["replace_section", "sections_of"]

_SECTION = re.compile(r"<!-- (?P<name>[\w-]+):begin -->.*?<!-- (?P=name):end -->\n?", re.S)


def sections_of(text: str) -> List[str]:
    """Every marked section of ``text``, markers included, in order."""
    return [m.group(0).rstrip("\n") + "\n" for m in _SECTION.finditer(text)]


def replace_section(path: str, name: str, body: str) -> None:
    """Write ``body`` as section ``name`` of the file at ``path`` (created if missing)."""
    block = f"<!-- {name}:begin -->\n{body.rstrip()}\n<!-- {name}:end -->\n"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:begin -->.*?<!-- {re.escape(name)}:end -->\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
