"""The README stays a short front page and the manual in docs/ keeps up with the code.

Sphinx itself is not run here (slow, and the test install has no Sphinx): CI's ``make docs``
builds the manual with warnings as errors. These checks read files only, plus the public
``__all__`` lists.
"""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: A Markdown link or image target: ``](target)``.
LINK = re.compile(r"\]\(([^)\s]+)\)")
#: A MyST link to a design note: ``{mirror-note}`title```.
NOTE_LINK = re.compile(r"\{mirror-note\}`([^`]+)`")


def _readme_links() -> List[str]:
    return [target for target in LINK.findall(README.read_text(encoding="utf-8"))
            if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def _api_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in sorted((DOCS / "api").glob("*.rst")))


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move detail to a docs/ page"


def test_readme_shows_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text


def test_every_page_the_readme_links_exists():
    links = _readme_links()
    assert any(link.startswith("docs/") for link in links), "the README links no docs page"
    missing = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README.md links missing files: {missing}"


def test_the_readme_links_every_guide_page():
    linked = {link.split("#")[0] for link in _readme_links()}
    pages = {path.relative_to(ROOT).as_posix() for path in (DOCS / "guide").glob("*.md")}
    assert pages and pages <= linked, f"guide pages the README does not link: {sorted(pages - linked)}"


@pytest.mark.parametrize("module", ["mxnet_mirror_hook", "mxnet_mirror_hook.gluon",
                                    "mxnet_mirror_hook.compat.memonger"])
def test_the_api_reference_documents_every_public_name(module):
    names = [name for name in importlib.import_module(module).__all__
             if name not in ("__version__", "memonger")]
    text = _api_text()
    missing = [name for name in names if f"{module}.{name}\n" not in text]
    assert not missing, f"docs/api/*.rst documents no {module}.X for {missing}"


def _resolve(dotted: str):
    """The object at ``package.module.name`` (or ``package.module:function``)."""
    parts = dotted.replace(":", ".").split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise AssertionError(f"no module in {dotted}")


def test_everything_the_docs_pages_import_exists():
    directive = re.compile(r"(?:\.\. auto\w+::|\.\. mirror-argparse::|\{mirror-argparse\})\s+(\S+)")
    texts = [path.read_text(encoding="utf-8") for path in DOCS.rglob("*") if path.suffix in (".md", ".rst")]
    targets = sorted({target for text in texts for target in directive.findall(text)})
    assert len(targets) > 20, "the API pages document almost nothing"
    for target in targets:
        assert _resolve(target) is not None, target


def test_the_environment_page_names_every_variable_the_package_reads():
    page = (DOCS / "environment.md").read_text(encoding="utf-8")
    source = "\n".join(path.read_text(encoding="utf-8")
                       for path in (ROOT / "mxnet_mirror_hook").rglob("*.py"))
    variables = set(re.findall(r"[\"']((?:MXNET|NNVM)_[A-Z0-9_]+)[\"']", source)) - {"MXNET_VARIABLES"}
    assert variables, "no environment variable found in the package source"
    missing = sorted(name for name in variables if f"`{name}" not in page)
    assert not missing, f"docs/environment.md does not name {missing}"


def _collect_notes(package: Path):
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from mirror_notes import collect_notes
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    return collect_notes(package)


def test_the_notes_collector_splits_adjacent_essays_and_quotes_the_longest(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "a.py").write_text(
        "# NOTE [ first ]\n# one\n#\n# NOTE [ second ]\n# two\n# three\nx = 1\n")
    # Read first (sorted before sub/), a line that names the note and goes on is a mention.
    (package / "_early.py").write_text("def f():\n    # NOTE [ first ] in a.py: short\n    return 1\n")
    notes = {note.title: note for note in _collect_notes(package)}
    assert set(notes) == {"first", "second"}
    assert notes["first"].text == ["one"] and notes["first"].path == "pkg/sub/a.py"
    assert notes["first"].mentions == ["pkg/_early.py:2"]
    assert notes["second"].text == ["two", "three"] and notes["second"].line == 4


def test_every_design_note_a_page_links_to_exists():
    titles = {note.title for note in _collect_notes(ROOT / "mxnet_mirror_hook")}
    assert len(titles) >= 20, "the notes collector found almost no NOTE essays"
    linked = {" ".join(title.split()) for path in DOCS.rglob("*.md")
              for title in NOTE_LINK.findall(path.read_text(encoding="utf-8"))}
    assert linked, "no docs page links a design note"
    assert linked <= titles, f"pages link notes the source no longer has: {sorted(linked - titles)}"


def test_every_test_bench_and_example_file_the_pages_name_exists():
    reference = re.compile(r"((?:tests|bench|examples)/[\w/]+\.py)(?:::(\w+))?")
    texts = [README.read_text(encoding="utf-8")] + [
        path.read_text(encoding="utf-8") for path in DOCS.rglob("*") if path.suffix in (".md", ".rst")]
    missing = []
    for text in texts:
        for path, test in reference.findall(text):
            if not (ROOT / path).is_file():
                missing.append(path)
            elif test and f"def {test}(" not in (ROOT / path).read_text(encoding="utf-8"):
                missing.append(f"{path}::{test}")
    assert not missing, f"the README or docs/ name files or tests that do not exist: {sorted(set(missing))}"
