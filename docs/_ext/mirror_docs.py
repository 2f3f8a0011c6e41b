"""Sphinx extension of this manual: the design notes collected from the source, and CLI help.

- ``.. mirror-notes::`` renders every ``# NOTE [ title ]`` essay of the package, grouped by
  the room it lives in, quoted as written, with its file and line; each essay gets the label
  ``note-<slug>`` so pages link to it.
- ``{mirror-note}`title``` (MyST) or ``:mirror-note:`title``` (reST) links to that essay; a
  title no essay has is an undefined-label warning, so a ``-W`` build fails when a page names
  a note the code no longer has.
- In docstrings that autodoc renders and in Markdown files pages include (``bench/RESULTS.md``),
  ``NOTE [ title ]`` of an essay that exists becomes such a link too (other titles stay text).
- ``.. mirror-modules::`` lists every module of the package with the first paragraph of its
  docstring (read without importing), so the code map follows the code.
- ``.. mirror-argparse:: module:function`` renders the ``--help`` text of the parser the
  function builds, and of each subcommand, so the CLI page follows the code.

The essays are read from the files, not imported: moving a module moves its notes with it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

import mirror_notes
from mirror_notes import ROOMS, Note, collect_notes, module_summaries, note_label, source_files

__all__ = ["NotesDirective", "ModulesDirective", "ArgparseDirective", "note_role", "setup"]

def _note_dependencies(env, package: Path) -> None:
    """Rebuild a generated page when the package's sources or this extension change."""
    for path in [*source_files(package), Path(__file__), Path(mirror_notes.__file__)]:
        env.note_dependency(str(path))


class NotesDirective(SphinxDirective):
    """``.. mirror-notes::``: every essay of the package, as sections grouped by room."""

    option_spec = {"package": directives.unchanged}

    def run(self) -> List[nodes.Node]:
        package = Path(self.env.srcdir).parent / self.options.get("package", "mxnet_mirror_hook")
        _note_dependencies(self.env, package)
        notes = collect_notes(package)
        captions = dict(ROOMS)
        result: List[nodes.Node] = []
        room, room_section = None, None
        for note in notes:
            if room_section is None or note.room != room:
                room = note.room
                caption = captions.get(room, f"{package.name}/{room}")
                room_section = self._section(caption, "notes-room-" + (room or "surfaces"))
                result.append(room_section)
            room_section += self._note_section(note)
        return result

    def _section(self, title: str, label: str) -> nodes.section:
        section = nodes.section()
        section["names"].append(label)
        section += nodes.title(title, title)
        self.state.document.note_implicit_target(section, section)
        return section

    def _note_section(self, note: Note) -> nodes.section:
        section = nodes.section()
        section["names"].append(note_label(note.title))
        section += nodes.title(note.title, note.title)
        self.state.document.note_explicit_target(section, section)
        where = nodes.paragraph()
        where += nodes.literal(text=f"{note.path}, line {note.line}")
        if note.mentions:
            where += nodes.Text("; also named at ")
            for index, mention in enumerate(note.mentions):
                where += nodes.Text(", " if index else "")
                where += nodes.literal(text=mention)
        section += where
        text = "\n".join(note.text).strip("\n") or "(no text)"
        block = nodes.literal_block(text, text)
        block["language"] = "none"
        section += block
        return section


class ModulesDirective(SphinxDirective):
    """``.. mirror-modules::``: each module's path and the first paragraph of its docstring."""

    option_spec = {"package": directives.unchanged}

    def run(self) -> List[nodes.Node]:
        package = Path(self.env.srcdir).parent / self.options.get("package", "mxnet_mirror_hook")
        _note_dependencies(self.env, package)
        items = nodes.definition_list()
        for path, summary in module_summaries(package):
            text, messages = self.state.inline_text(summary or "(no docstring)", self.lineno)
            items += nodes.definition_list_item(
                "", nodes.term("", "", nodes.literal(text=path)),
                nodes.definition("", nodes.paragraph("", "", *text), *messages))
        return [items]


def note_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """``:mirror-note:`title```: a link to the essay ``title`` on the notes page."""
    title = " ".join(text.split())
    reference = addnodes.pending_xref(rawtext, refdomain="std", reftype="ref",
                                      reftarget=note_label(title), refexplicit=True,
                                      refwarn=True)
    reference += nodes.inline(rawtext, f"NOTE [ {title} ]", classes=["xref", "std", "std-ref"])
    return [reference], []


class ArgparseDirective(SphinxDirective):
    """``.. mirror-argparse:: package.module:function``: the parser's help, and its subcommands'."""

    required_arguments = 1

    def run(self) -> List[nodes.Node]:
        module_name, _, function = self.arguments[0].partition(":")
        parser = getattr(importlib.import_module(module_name), function)()
        self.env.note_dependency(importlib.import_module(module_name).__file__)
        blocks = []
        for parser_help in _helps(parser):
            block = nodes.literal_block(parser_help, parser_help)
            block["language"] = "none"
            blocks.append(block)
        return blocks


#: A note named in a docstring; the title may wrap onto the next line.
_NAMED_NOTE = re.compile(r"NOTE\s+\[\s+([^\]]{1,100}?)\s+\]")


def _note_titles(app: Sphinx) -> Set[str]:
    titles = getattr(app, "_mirror_note_titles", None)
    if titles is None:
        package = Path(app.srcdir).parent / "mxnet_mirror_hook"
        titles = app._mirror_note_titles = {note.title for note in collect_notes(package)}
    return titles


def _linked(text: str, titles: Set[str], role: str) -> str:
    """``text`` with each ``NOTE [ title ]`` of a known title written as ``role`title```."""
    def link(match: "re.Match[str]") -> str:
        title = " ".join(match.group(1).split())
        inside_code = text.count("`", text.rfind("\n", 0, match.start()) + 1, match.start()) % 2
        return f"{role}`{title}`" if title in titles and not inside_code else match.group(0)

    return _NAMED_NOTE.sub(link, text)


def link_notes_in_docstring(app: Sphinx, what, name, obj, options, lines: List[str]) -> None:
    """``autodoc-process-docstring``: named notes become ``:mirror-note:`` links."""
    text = "\n".join(lines)
    linked = _linked(text, _note_titles(app), ":mirror-note:")
    if linked != text:
        lines[:] = linked.split("\n")


def link_notes_in_include(app: Sphinx, path: Path, docname: str, source: List[str]) -> None:
    """``include-read``: named notes in an included Markdown file become ``{mirror-note}`` links.

    A file with code fences is left as it is (a fence's text must stay literal).
    """
    if Path(path).suffix == ".md" and "```" not in source[0]:
        source[0] = _linked(source[0], _note_titles(app), "{mirror-note}")


def _helps(parser: argparse.ArgumentParser) -> Iterator[str]:
    """``parser``'s help, then each subcommand's, at a fixed width."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        yield parser.format_help().rstrip()
        for action in parser._actions:  # argparse keeps subparsers only here
            if isinstance(action, argparse._SubParsersAction):
                for subparser in action.choices.values():
                    yield subparser.format_help().rstrip()
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def setup(app: Sphinx) -> Dict[str, object]:
    app.add_directive("mirror-notes", NotesDirective)
    app.add_directive("mirror-modules", ModulesDirective)
    app.add_directive("mirror-argparse", ArgparseDirective)
    app.add_role("mirror-note", note_role)
    # Before numpydoc (priority 500) reshapes the docstring.
    app.connect("autodoc-process-docstring", link_notes_in_docstring, priority=400)
    app.connect("include-read", link_notes_in_include)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
